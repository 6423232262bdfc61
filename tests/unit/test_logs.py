"""pd_serve.logs: JSON lines carry their fields, odd records never raise, secrets are masked."""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Iterator

import pytest

from pd_serve import logs
from pd_serve.logs import JsonFormatter, LogConfig, RedactSecrets, redact

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON through the redaction filter into a buffer (the root logger is left alone)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("bootstrap"))
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("pd_serve.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_a_json_line_carries_every_field(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.info("node %s registered", "p-0", extra={"node_id": "p-0", "pages": 12, "tags": ["a"]})
    (line,) = lines(stream)
    assert TS.match(str(line["ts"])), line["ts"]
    assert line["level"] == "INFO" and line["logger"] == "pd_serve.test_logs" and line["role"] == "bootstrap"
    assert isinstance(line["pid"], int) and line["msg"] == "node p-0 registered"
    assert (line["node_id"], line["pages"], line["tags"]) == ("p-0", 12, ["a"])
    assert "exc" not in line


def test_exceptions_come_with_their_traceback(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    try:
        raise KeyError("room 7")
    except KeyError:
        logger.exception("lost a room\nsecond line")
    (line,) = lines(stream)  # a multi-line message and traceback still make one line
    assert line["level"] == "ERROR" and line["msg"] == "lost a room\nsecond line"
    assert "Traceback" in str(line["exc"]) and "KeyError: 'room 7'" in str(line["exc"])


def test_odd_records_never_raise(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture

    class NoRepr:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    logger.info({"not": "a string"})
    logger.info("%d pages", "many")  # the wrong type for its format
    logger.info("extras", extra={"obj": object(), "nan": math.nan, "bad": NoRepr(), "keys": {(1, 2): 3}})
    first, second, third = lines(stream)
    assert first["msg"] == "{'not': 'a string'}"
    assert "%d pages" in str(second["msg"]) and "many" in str(second["msg"])
    assert str(third["obj"]).startswith("<object object") and third["nan"] == "nan"
    assert "failing repr" in str(third["bad"]) and third["keys"] == "{(1, 2): 3}"


SECRETS = [
    ("Authorization: Bearer sk-live-0123456789", "Authorization: Bearer ***"),
    (
        "headers [(b'authorization', b'Bearer tok_ABCdef123'), (b'x-pd-cluster-token', b'cl-9f8e7d')]",
        "headers [(b'authorization', b'Bearer ***'), (b'x-pd-cluster-token', b'***')]",
    ),
    ("X-PD-Cluster-Token: Zm9vYmFyYmF6", "X-PD-Cluster-Token: ***"),
    ("retry with bearer eyJhbGciOi.J9-x_y", "retry with bearer ***"),
    ("GET /x?api_key=abc123&limit=2", "GET /x?api_key=***&limit=2"),
    ("token=s3cr3t; next", "token=***; next"),
    ('{"cluster_token": "t0k3n", "api-key": "k"}', '{"cluster_token": "***", "api-key": "***"}'),
    ("password=hunter2", "password=***"),
]
PLAIN = [
    "prompt has 12 tokens, max_tokens=32, 3 prompt_tokens",
    "Bearer authentication is required; no Authorization header was sent",
    "token budget exhausted for room 42",
    "missing authorization, refusing",
]


@pytest.mark.parametrize(("text", "masked"), SECRETS)
def test_redaction_masks_each_secret_pattern(text: str, masked: str) -> None:
    assert redact(text) == masked


@pytest.mark.parametrize("text", PLAIN)
def test_redaction_leaves_normal_text_alone(text: str) -> None:
    assert redact(text) == text


def test_the_filter_masks_messages_extras_and_tracebacks(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    try:
        raise ValueError("bad header Authorization: Bearer sk-9876543210")
    except ValueError:
        logger.warning("from %s", "x-pd-cluster-token=cl-abc123", exc_info=True, extra={"hdr": "token=xyz-1"})
    (line,) = lines(stream)
    text = json.dumps(line)
    assert "cl-abc123" not in text and "sk-9876543210" not in text and "xyz-1" not in text
    assert line["msg"] == "from x-pd-cluster-token=***" and line["hdr"] == "token=***"


def test_setup_logging_replaces_its_handler_and_is_inherited_by_current() -> None:
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        logs.setup_logging("decode", "debug", "text")
        logs.setup_logging("decode", "warning", "json")
        ours = [h for h in root.handlers if h not in before[0]]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
        assert root.level == logging.WARNING and logs.current() == LogConfig("decode", "warning", "json")
    finally:
        for handler in [h for h in root.handlers if h not in before[0]]:
            root.removeHandler(handler)
        root.setLevel(before[1])
        logging.captureWarnings(False)


def test_bad_settings_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--log-format"):
        LogConfig("frontend", "info", "xml")
    with pytest.raises(ValueError, match="--log-level"):
        LogConfig("frontend", "loud", "text")


def test_granian_loggers_propagate_to_ours() -> None:
    config = logs.granian_log_config()
    assert config["handlers"] == {} and config["formatters"] == {}
    assert all(v == {"handlers": [], "propagate": True} for v in config["loggers"].values())
    assert set(config["loggers"]) == {"_granian", "granian.access"}


def test_up_status_lines_follow_the_log_format(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import argparse

    from pd_serve.frontend.up import say

    say(argparse.Namespace(log_format="text"), "decode-0 exited with -9", logging.ERROR)
    assert capsys.readouterr().err == "pd-serve up: decode-0 exited with -9\n"
    with caplog.at_level(logging.INFO, logger="pd_serve.up"):
        say(argparse.Namespace(log_format="json"), "stopping", logging.INFO)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("pd_serve.up", logging.INFO, "stopping")
    ]
    assert capsys.readouterr().err == ""
