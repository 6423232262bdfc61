"""Unit tests of the bootstrap config, token sources and the `pd-serve bootstrap` flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pd_serve.bootstrap import cli as bootstrap_cli
from pd_serve.bootstrap.config import TOKEN_ENV, BootstrapConfig, BootstrapConfigError, read_token
from pd_serve.bootstrap.errors import RetryPolicy


def test_defaults_are_valid_and_token_stays_out_of_repr() -> None:
    config = BootstrapConfig(auth_token="hunter2")
    assert config.store == "memory" and config.port == 8998
    assert "hunter2" not in repr(config)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"node_ttl": 0}, "--node-ttl"),
        ({"max_nodes": 0}, "--max-nodes"),
        ({"port": 70000}, "--port"),
        ({"store": "mysql://x"}, "--store"),
        ({"auth_token": " "}, "--auth-token"),
        ({"log_level": "loud"}, "--log-level"),
    ],
)
def test_invalid_values_name_the_flag(changes: dict[str, object], flag: str) -> None:
    with pytest.raises(BootstrapConfigError, match=flag):
        BootstrapConfig(**changes)  # type: ignore[arg-type]


def test_store_password_is_redacted_for_logs() -> None:
    assert BootstrapConfig(store="redis://:pw@h:6379/0").store_display == "redis://***@h:6379/0"
    assert BootstrapConfig(store="redis://h:6379/1").store_display == "redis://h:6379/1"


def test_token_from_file_then_env(tmp_path: Path) -> None:
    token_file = tmp_path / "t"
    token_file.write_text("from-file\n")
    assert read_token(token_file, env={TOKEN_ENV: "from-env"}) == "from-file"
    assert read_token(None, env={TOKEN_ENV: " from-env "}) == "from-env"
    assert read_token(None, env={}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(BootstrapConfigError, match="--cluster-token-file"):
        read_token(tmp_path / "empty")
    with pytest.raises(BootstrapConfigError, match="cannot read"):
        read_token(tmp_path / "missing")


def test_cli_flags_build_the_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bootstrap_cli.add_arguments(parser)
    token_file = tmp_path / "t"
    token_file.write_text("tok")
    args = parser.parse_args(
        [
            "--port",
            "9100",
            "--store",
            "redis://127.0.0.1:6379/2",
            "--node-ttl",
            "1.5",
            "--max-nodes",
            "7",
            "--cluster-token-file",
            str(token_file),
        ]
    )
    config = bootstrap_cli.config_from_args(args)
    assert (config.port, config.store, config.node_ttl, config.max_nodes) == (
        9100,
        "redis://127.0.0.1:6379/2",
        1.5,
        7,
    )
    assert config.auth_token == "tok"


def test_cli_reports_bad_flags_without_starting(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bootstrap_cli.add_arguments(parser)
    assert bootstrap_cli.run(parser.parse_args(["--node-ttl", "-1"])) == 2
    assert "--node-ttl" in capsys.readouterr().err


def test_subcommand_is_registered() -> None:
    from pd_serve.cli import SUBCOMMANDS

    assert SUBCOMMANDS["bootstrap"][0] == "pd_serve.bootstrap.cli"


def test_retry_policy_backs_off_to_the_cap() -> None:
    delays = RetryPolicy(attempts=3, initial_backoff=0.1, max_backoff=0.3).delays()
    assert [round(next(delays), 3) for _ in range(4)] == [0.1, 0.2, 0.3, 0.3]
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
