"""docker/compose.yaml: no secret in the file, real `t2i` commands and health checks, and, where Docker with
compose is installed, what `docker compose config` makes of it: the secrets in place, ports on 127.0.0.1, the
data mounted, and no start without the secrets."""

from __future__ import annotations

import json
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


def _has_compose() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


needs_compose = pytest.mark.skipif(
    not _has_compose(),
    reason="docker compose is not installed here: the file is resolved by the real `docker compose config` "
    "only where it is",
)


def compose_config(env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    """`docker compose config` of the file with `env` as its only secrets (an empty env file stands in for
    docker/.env, which a developer's machine may have)."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    others = {k: v for k, v in os.environ.items() if k not in ENV}
    command = [
        "docker",
        "compose",
        "--env-file",
        str(empty),
        "-f",
        str(COMPOSE),
        "config",
        "--format",
        "json",
    ]
    return subprocess.run(command, env={**others, **env}, capture_output=True, text=True, timeout=60)


def test_compose_holds_no_secret():
    text = COMPOSE.read_text()
    assert "pw-from-env" not in text and not re.search(r"PASSWORD:\s*[\w-]+\s*$", text, re.M)
    ignored = subprocess.run(["git", "check-ignore", "docker/.env"], cwd=REPO, capture_output=True, text=True)
    assert ignored.returncode == 0, "docker/.env must be ignored by git"


def test_compose_runs_a_server_a_deploy_and_gpu_workers():
    """The file as written (YAML anchors merged, nothing interpolated)."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"postgres", "prefect-server", "deploy", "worker"}
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


@needs_compose
def test_docker_compose_config_puts_the_secrets_in_place(tmp_path):
    proc = compose_config(ENV, tmp_path)
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]  # compose writes ports and volumes in the long syntax
    server, worker = services["prefect-server"], services["worker"]
    assert "pw-from-env" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == ENV["PREFECT_API_AUTH_STRING"]
    assert worker["environment"]["PREFECT_API_AUTH_STRING"] == ENV["PREFECT_API_AUTH_STRING"]
    for name, service in services.items():
        assert all(port["host_ip"] == "127.0.0.1" for port in service.get("ports", [])), name
    assert {"/workspace", "/data/imagenet"} <= {volume["target"] for volume in worker["volumes"]}


@needs_compose
@pytest.mark.parametrize("missing", sorted(ENV))
def test_docker_compose_refuses_to_start_without_each_secret(tmp_path, missing):
    proc = compose_config({k: v for k, v in ENV.items() if k != missing}, tmp_path)
    assert proc.returncode != 0 and missing in proc.stderr, proc.stderr
