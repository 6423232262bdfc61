"""Config files: every shipped file under configs/ is valid for its role, and the --config rules hold
(flags over file over defaults, unknown keys and bad values named with the file, --print-config)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pd_serve.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
SUBPROCESS_TIMEOUT_S = 60.0


def role_of(path: Path) -> str:
    """local-*.yaml are `pd-serve up` files; gpu-cluster/ROLE.yaml and colocated.yaml name their role."""
    if path.name.startswith("local-"):
        return "up"
    return path.stem


def shipped_configs() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def print_config(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    assert main([*argv, "--print-config"]) == 0
    return dict(yaml.safe_load(capsys.readouterr().out))


def test_every_role_has_a_shipped_config() -> None:
    roles = {role_of(p) for p in shipped_configs()}
    assert roles >= {"up", "colocated", "bootstrap", "prefill", "decode", "frontend"}


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_prints(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In process (each `python -m pd_serve.cli` costs seconds of torch import on 2 shared cores)."""
    printed = print_config(capsys, [role_of(path), "--config", str(path)])
    for key, value in (yaml.safe_load(path.read_text()) or {}).items():
        assert printed[key] == value, f"{path}: {key} printed as {printed[key]!r}"


def test_print_config_through_the_command_line() -> None:
    path = CONFIGS / "local-2p2d.yaml"
    argv = [sys.executable, "-m", "pd_serve.cli", "up", "--config", str(path), "--print-config"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert (printed["num-prefill"], printed["num-decode"]) == (2, 2)
    assert done.stdout.startswith(f"# pd-serve up: effective config (flags, then {path}")


def test_up_defaults_are_local_1p1d(capsys: pytest.CaptureFixture[str]) -> None:
    defaults = print_config(capsys, ["up"])
    from_file = print_config(capsys, ["up", "--config", str(CONFIGS / "local-1p1d.yaml")])
    assert defaults == from_file


def test_printed_config_is_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = print_config(capsys, ["prefill", "--config", str(CONFIGS / "gpu-cluster" / "prefill.yaml")])
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(first))
    assert print_config(capsys, ["prefill", "--config", str(again)]) == first


def test_flags_win_over_the_file_even_at_their_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "up.yaml"
    cfg.write_text("port: 9100\npolicy: least_load\nnum_decode: 3\n")
    # --port 8000 is up's default: typed on the command line, it still wins over the file
    printed = print_config(capsys, ["up", "--config", str(cfg), "--port", "8000", "--num-decode", "2"])
    assert (printed["port"], printed["policy"], printed["num-decode"]) == (8000, "least_load", 2)


def test_list_and_switch_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text("decode: [http://d1:1, http://d2:2]\n")
    assert print_config(capsys, ["frontend", "--config", str(cfg)])["decode"] == ["http://d1:1", "http://d2:2"]
    printed = print_config(capsys, ["frontend", "--config", str(cfg), "--decode", "http://d3:3"])
    assert printed["decode"] == ["http://d3:3"]
    for text in ("disable-prefix-caching: true\n", "enable_prefix_caching: false\n"):
        cfg.write_text(text)
        assert print_config(capsys, ["colocated", "--config", str(cfg)])["disable-prefix-caching"] is True


@pytest.mark.parametrize(
    ("role", "text", "named"),
    [
        ("bootstrap", "port: 9000\nno-such-flag: 1\n", "'no-such-flag' is not a flag of pd-serve bootstrap"),
        ("colocated", "port: abc\n", "'port': 'abc' is not a valid --port value"),
        ("up", "policy: nope\n", "'policy': 'nope' is not one of"),
        ("frontend", "decode: http://d:1\nport: 70000\n", "70000 is outside 0..65535 (set in"),
        ("decode", "print-config: true\n", "'print-config' is not a flag"),
        ("prefill", "- a list\n", "must hold a mapping"),
    ],
)
def test_bad_files_name_key_and_file(
    role: str, text: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / f"{role}.yaml"
    cfg.write_text(text)
    assert main([role, "--config", str(cfg), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert named in err and str(cfg) in err


def test_api_keys_are_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["frontend", "--decode", "http://d:1", "--api-key", "sekret", "--api-key", "other-key-9", "--node-api-key", "nk"]
    assert main([*argv, "--print-config"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed["api-key"] == ["<hidden>", "<hidden>"] and printed["node-api-key"] == "<hidden>"
    assert "sekret" not in out and "other-key-9" not in out
