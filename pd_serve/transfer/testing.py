"""Blocking frame readers for tests that play a raw protocol peer on a plain socket.

The transfer layer itself speaks through asyncio (`connection.py`); nothing here is used by it.
"""

from __future__ import annotations

import socket

from pd_serve.transfer.messages import FRAME_PREFIX, Message, decode


def read_exact(sock: socket.socket, n: int) -> bytes:
    """n bytes from sock (its own timeout applies); ConnectionError if the peer closes first."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def read_frame(sock: socket.socket) -> Message:
    """The next frame's message; its payload, if any, is left unread on the socket."""
    header_len, _ = FRAME_PREFIX.unpack(read_exact(sock, FRAME_PREFIX.size))
    return decode(read_exact(sock, header_len))


def split_frames(data: bytes) -> list[tuple[Message, bytes]]:
    """Every whole frame in a captured byte stream: (message, its header frame bytes)."""
    out, pos = [], 0
    while pos + FRAME_PREFIX.size <= len(data):
        header_len, payload_len = FRAME_PREFIX.unpack_from(data, pos)
        end = pos + FRAME_PREFIX.size + header_len
        out.append((decode(data[pos + FRAME_PREFIX.size : end]), data[pos:end]))
        pos = end + payload_len
    return out
