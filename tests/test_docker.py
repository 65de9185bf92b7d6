"""docker/compose.yaml: valid for `docker compose config` where Docker is installed, and, everywhere, checked
for what the service needs: no secret in the file, ports on 127.0.0.1, real `t2i` commands, health checks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from t2i.flows.cli import build_parser
from tests.conftest import REPO

COMPOSE = REPO / "docker" / "compose.yaml"
ENV = {"POSTGRES_PASSWORD": "pw-from-env", "PREFECT_API_AUTH_STRING": "t2i:auth-from-env"}


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (a missing required variable raises)."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, text)


def test_compose_holds_no_secret_and_refuses_to_start_without_them():
    text = COMPOSE.read_text()
    assert "pw-from-env" not in text and not re.search(r"PASSWORD:\s*[\w-]+\s*$", text, re.M)
    for missing in ENV:  # each secret is required, from docker/.env or the environment
        with pytest.raises(KeyError, match=missing):
            _interpolate(text, {k: v for k, v in ENV.items() if k != missing})
    ignored = subprocess.run(["git", "check-ignore", "docker/.env"], cwd=REPO, capture_output=True, text=True)
    assert ignored.returncode == 0, "docker/.env must be ignored by git"


def test_compose_runs_a_server_a_deploy_and_gpu_workers():
    services = yaml.safe_load(_interpolate(COMPOSE.read_text(), ENV))["services"]
    assert set(services) == {"postgres", "prefect-server", "deploy", "worker"}
    server = services["prefect-server"]
    assert "pw-from-env" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == ENV["PREFECT_API_AUTH_STRING"]
    for name, service in services.items():
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", [])), name
        if name != "deploy":
            assert "healthcheck" in service, name
    parser = build_parser()
    deploy, worker = services["deploy"], services["worker"]
    assert parser.parse_args(deploy["command"]).command == "deploy" and deploy["restart"] == "no"
    assert parser.parse_args(worker["command"]).command == "worker"
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    assert worker["ipc"] == "host"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert worker["environment"]["PREFECT_API_AUTH_STRING"] == ENV["PREFECT_API_AUTH_STRING"]
    mounts = {v.split(":")[1] for v in worker["volumes"]}
    assert {"/workspace", "/data/imagenet"} <= mounts


def _has_compose() -> bool:
    return (
        bool(shutil.which("docker"))
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _has_compose(), reason="docker compose is not installed")
def test_docker_compose_config_accepts_the_file():
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
