"""Sending to the frontend's client over ASGI: every send that can find the client gone.

- `send_checked(send, message)`: one ASGI message; `ClientGone` if the client went away.
- `reply(send, status, body, headers)`: a whole JSON response, the same way.

`ClientGone` is how the relay and the app learn that nobody reads any more: they stop, release
what they hold and count the request as 499. Nothing here retries or logs.
"""

from __future__ import annotations

from pd_serve.http_common import Headers, Message, Send
from pd_serve.http_common import reply as send_reply


class ClientGone(Exception):
    """The client went away while the answer was being sent."""


async def send_checked(send: Send, message: Message) -> None:
    try:
        await send(message)
    except (OSError, RuntimeError) as exc:  # the server's way of saying the client is gone
        raise ClientGone(str(exc)) from exc


async def reply(send: Send, status: int, body: bytes, headers: Headers = ()) -> None:
    """A whole JSON response; ClientGone if the client went away meanwhile."""

    async def checked(message: Message) -> None:
        await send_checked(send, message)

    await send_reply(checked, status, body, headers)
