"""`--log-format json` on a real `pd-serve bootstrap`: every line it writes (Granian's supervisor and
worker lines included) is one JSON object with role "bootstrap", and the cluster token never shows.
The `pd-serve up` variant (every child's log file) is in test_frontend_up.py."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest
from bootstrap_helpers import registration

from pd_serve.bootstrap.config import TOKEN_ENV
from pd_serve.bootstrap.process import BootstrapProcess

pytestmark = pytest.mark.timeout(60)
TOKEN = "json-logs-token-that-must-never-be-logged-0123"


def test_bootstrap_logs_one_json_object_per_line_without_the_token() -> None:
    env = {**os.environ, TOKEN_ENV: TOKEN, "PYTHONUNBUFFERED": "1"}
    proc = BootstrapProcess(args=["--log-format", "json", "--log-level", "debug"], env=env)
    try:
        with httpx.Client(base_url=proc.url, timeout=10.0) as http:
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert http.put("/v1/nodes/p-0", json=registration(), headers=good).status_code == 201
            assert http.get("/v1/nodes", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.delete("/v1/nodes/p-0", headers=good).status_code in (200, 204)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.popen.wait(20) == 0
        text = proc.log_text()
    finally:
        proc.stop()
    records = [json.loads(line) for line in text.splitlines()]  # a line that is not JSON fails here
    assert records and all(isinstance(r, dict) and r["role"] == "bootstrap" for r in records)
    assert {"ts", "level", "logger", "pid", "msg"} <= set(records[0])
    messages = [r["msg"] for r in records]
    assert any("node p-0 registered" in m for m in messages), messages
    assert any(r["logger"].startswith("_granian") for r in records)  # Granian's own lines, routed too
    assert TOKEN not in text
