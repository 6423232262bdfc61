"""`pd-serve colocated` over TLS (HTTP/2 by ALPN) and its shutdown on SIGTERM: finishes, no orphans.

The certificate is self-signed, made here. The shutdown test ends the module's server, so it is last.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from server_helpers import NodeProcess, parent_pid, pid_alive, sse_events, wait_until


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _ctx(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Path]]:
    cert = _self_signed(tmp_path_factory.mktemp("tls"))
    proc = NodeProcess(["--max-total-tokens", "4096"], cert=cert)
    yield proc, cert[0]
    proc.stop()


def test_tls_http2_by_alpn(tls_node: tuple[NodeProcess, Path]) -> None:
    node, cert = tls_node
    with httpx.Client(http1=False, http2=True, verify=_ctx(cert), timeout=60) as c:
        r = c.post(f"{node.url}/v1/completions", json={"model": "demo", "prompt": "hello", "max_tokens": 3})
    assert r.status_code == 200 and r.http_version == "HTTP/2"
    assert r.json()["usage"]["completion_tokens"] <= 3
    with httpx.Client(verify=_ctx(cert), timeout=60) as c:  # HTTP/1.1 on the same port
        assert c.get(f"{node.url}/health").http_version == "HTTP/1.1"


def test_sigterm_finishes_streams_and_leaves_no_orphans(tls_node: tuple[NodeProcess, Path]) -> None:
    node, cert = tls_node
    engine = httpx.get(f"{node.url}/server_info", verify=_ctx(cert), timeout=30).json()["engine_pid"]
    worker = parent_pid(engine)
    events: list[Any] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "demo", "prompt": "the frontend", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{node.url}/v1/completions", json=body, verify=_ctx(cert), timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    started.set()
            events.extend(sse_events(lines))

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60), "the stream never started"
    os.kill(node.pid, signal.SIGTERM)  # the supervisor only, as a service manager would
    reader.join(60)
    assert not reader.is_alive()
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "abort"
    assert node.popen.wait(60) == 0
    for pid in (worker, engine):
        wait_until(lambda pid=pid: not pid_alive(pid), 30, f"process {pid} gone")
