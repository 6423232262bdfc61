"""The node's gRPC listener (`--grpc-port`): grpcio's asyncio server in the API process, beside the
HTTP app, serving SGLang's `SglangScheduler` (`grpc_service.SchedulerService`) to smg's `grpc://` workers.

- `start_grpc_server(state)`: in the app's lifespan once the node has started; None without
  `--grpc-port`. Messages either way are limited to `--grpc-max-message-bytes`.
- `GrpcServer.close()`: before the node stops; calls still open get `STOP_GRACE_S` to end, then are
  cancelled (their engine requests aborted, their pages freed).
It must never start without the caller check of `grpc_service.CallerCheck`, nor run the model.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc

from pd_serve.server.grpc_service import SchedulerService
from pd_serve.server.state import NodeState

log = logging.getLogger(__name__)
STOP_GRACE_S = 2.0


class GrpcServer:
    def __init__(self, state: NodeState, host: str, port: int, max_message_bytes: int) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second node on the same port fails to start, as HTTP does
        ]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.server: Any = grpc.aio.server(options=options)
        sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(SchedulerService(state), self.server)
        if self.server.add_insecure_port(self.address) == 0:
            raise OSError(f"--grpc-port: cannot listen on {self.address} (in use?)")

    async def start(self) -> None:
        await self.server.start()
        log.info("gRPC (SGLang scheduler service, for smg's grpc:// workers) on %s", self.address)

    async def close(self) -> None:
        await self.server.stop(STOP_GRACE_S)


async def start_grpc_server(state: NodeState) -> GrpcServer | None:
    config = state.config
    if config.grpc_port is None:
        return None
    server = GrpcServer(state, config.host, config.grpc_port, config.grpc_max_message_bytes)
    await server.start()
    return server
