"""The package as users install it: one `t2i` namespace, so `flows`, `tasks`, `models` and `data` never
collide with a user's own modules of those names, from a wheel and from the editable install alike."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from t2i.flows.config import load_config
from t2i.flows.plan import Plan
from tests.conftest import REPO
from tests.flows.test_cli import SMALL, overrides

# Every stage from the wheel, with template captions: the vLLM engine is tested elsewhere, and what can break
# here is the packaging (a module, preset or committed weight file missing from the wheel).
WHEEL_RUN = [*SMALL, "--set", "recaption.backend=template", "--set", "download.max_images=96"]

FOLDERS = ["flows", "tasks", "models", "data"]
NOT_SOURCES = [".git", ".venv", "workspace", "build", "*.egg-info", "__pycache__", ".*_cache", "tests"]


def _python(python: Path | str, code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (the checkout itself gets no build/ or egg-info)."""
    root = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, root / "src", ignore=shutil.ignore_patterns(*NOT_SOURCES))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(root / "dist"), str(root / "src")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = (root / "dist").glob("t2i_imagenet-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel (not editable); its dependencies come from this venv's site-packages
    through a plain path entry, which does not run this venv's editable-install hook."""
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = _python(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])", venv).stdout.strip()
    Path(site, "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--ignore-installed", "--no-compile", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return venv


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_the_wheel_holds_exactly_one_top_level_package_with_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"t2i"}
    assert "t2i/flows/presets/imagenet256.yaml" in names
    assert "t2i/models/weights/shapes-captioner/model.safetensors" in names
    assert "t2i/models/cpu_site/sitecustomize.py" in names


def test_the_installed_wheel_imports_only_under_t2i(wheel_venv, tmp_path):
    python = wheel_venv / "bin" / "python"
    found = _python(python, "import t2i.flows.cli as m; print(m.__file__)", tmp_path, _clean_env())
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).is_relative_to(wheel_venv)
    for name in FOLDERS:
        proc = _python(python, f"import {name}", tmp_path, _clean_env())
        assert f"No module named '{name}'" in proc.stderr, (name, proc.stderr)


@pytest.mark.slow
def test_the_installed_wheel_runs_the_pipeline(wheel_venv, workspace, cli_env, tmp_path):
    env = {k: v for k, v in cli_env.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(wheel_venv / "bin" / "t2i"), "run", "--preset", "tiny", "--workspace", str(workspace), *WHEEL_RUN],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = Plan(load_config("tiny", overrides(WHEEL_RUN), str(workspace)))
    assert all(art.is_complete() for _, _, art in plan.artifacts())


def test_the_editable_install_imports_only_under_t2i(tmp_path):
    found = _python(sys.executable, "import t2i.data as m; print(m.__file__)", tmp_path, _clean_env())
    assert Path(found.stdout.strip()) == REPO / "data" / "__init__.py", found.stderr
    for name in FOLDERS:
        proc = _python(sys.executable, f"import {name}", tmp_path, _clean_env())
        assert f"No module named '{name}'" in proc.stderr, (name, proc.stderr)
