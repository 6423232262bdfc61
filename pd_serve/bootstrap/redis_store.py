"""The shared node store on Redis (redis-py asyncio), for several bootstrap replicas and restarts.

Layout under the prefix P: `P:node:{id}` holds the record's JSON with a PX expiry of --node-ttl (Redis
expires it, so every replica sees the same set and a restart loses nothing), and the set `P:ids` indexes
the ids. An id whose key has expired is removed from the set by whichever replica lists first, with a
script that removes it only if the key is still absent, so a node re-registering at that moment is
never lost. The --max-nodes check is not atomic across replicas: concurrent joins may overshoot by a few.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pd_serve.bootstrap.records import Load, NodeRecord, NodeRegistration
from pd_serve.bootstrap.store import Clock, ExpireHook, NodeNotFound, NodeStore, PutResult, StoreFull

# KEYS[1] = the node key, KEYS[2] = the id set, ARGV[1] = the id
_DROP_IF_EXPIRED = """
if redis.call('exists', KEYS[1]) == 0 then
  return redis.call('srem', KEYS[2], ARGV[1])
end
return 0
"""


class RedisStore(NodeStore):
    """Node records as Redis keys with a TTL, indexed by one set."""

    def __init__(
        self,
        url: str,
        ttl: float,
        max_nodes: int,
        on_expire: ExpireHook | None = None,
        clock: Clock = time.time,
        prefix: str = "pd-serve:bootstrap",
    ) -> None:
        super().__init__(ttl, max_nodes, on_expire, clock)
        self._url = url
        self._prefix = prefix
        self._ids_key = f"{prefix}:ids"
        self._redis: aioredis.Redis | None = None
        # node id -> (raw JSON, parsed record): a long-poll re-reads every record each poll interval,
        # and parsing 1000 records costs ~50 ms, while most of them have not changed since the last read
        self._parsed: dict[str, tuple[bytes | str, NodeRecord]] = {}

    async def start(self) -> None:
        self._redis = aioredis.from_url(self._url, socket_connect_timeout=5, socket_timeout=10)
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            await self._redis.aclose()
            raise ConnectionError(
                f"store (--store): cannot reach Redis: {type(exc).__name__}: {exc}"
            ) from exc
        self._drop_if_expired = self._redis.register_script(_DROP_IF_EXPIRED)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def _r(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("RedisStore used before start() or after close()")
        return self._redis

    def _key(self, node_id: str) -> str:
        return f"{self._prefix}:node:{node_id}"

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    async def put(self, node_id: str, registration: NodeRegistration) -> PutResult:
        raw = await self._r.get(self._key(node_id))
        old = NodeRecord.model_validate_json(raw) if raw is not None else None
        if old is None:
            await self._check_room()
        result = self._new_record(node_id, registration, old)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(self._key(node_id), result.record.model_dump_json(), px=self._ttl_ms)
            pipe.sadd(self._ids_key, node_id)
            await pipe.execute()
        return result

    async def _check_room(self) -> None:
        if await self._r.scard(self._ids_key) < self.max_nodes:
            return
        live = len(await self.list())  # drops expired ids, then counts again
        if live >= self.max_nodes:
            raise StoreFull(f"{live} nodes registered, the limit is --max-nodes {self.max_nodes}")

    async def heartbeat(self, node_id: str, load: Load | None) -> NodeRecord:
        raw = await self._r.get(self._key(node_id))
        if raw is None:
            raise NodeNotFound(node_id)
        record = self._beat(NodeRecord.model_validate_json(raw), load)
        # xx: if the key expired between the two calls, the node is gone and must re-register
        if not await self._r.set(self._key(node_id), record.model_dump_json(), px=self._ttl_ms, xx=True):
            raise NodeNotFound(node_id)
        return record

    async def delete(self, node_id: str) -> bool:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(node_id))
            pipe.srem(self._ids_key, node_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def get(self, node_id: str) -> NodeRecord | None:
        raw = await self._r.get(self._key(node_id))
        return NodeRecord.model_validate_json(raw) if raw is not None else None

    async def list(self) -> list[NodeRecord]:
        ids = sorted(i.decode() if isinstance(i, bytes) else i for i in await self._r.smembers(self._ids_key))
        raws = await self._r.mget([self._key(i) for i in ids]) if ids else []
        records = []
        for node_id, raw in zip(ids, raws):
            if raw is not None:
                records.append(self._parse(node_id, raw))
            elif await self._drop_if_expired(keys=[self._key(node_id), self._ids_key], args=[node_id]):
                self._on_expire(node_id)
        live = {r.node_id for r in records}
        self._parsed = {k: v for k, v in self._parsed.items() if k in live}
        return records

    def _parse(self, node_id: str, raw: bytes | str) -> NodeRecord:
        cached = self._parsed.get(node_id)
        if cached is not None and cached[0] == raw:
            return cached[1]
        record = NodeRecord.model_validate_json(raw)
        self._parsed[node_id] = (raw, record)
        return record

    async def ping(self) -> bool:
        try:
            return bool(await self._r.ping())
        except (RedisError, OSError):  # /health reports it as unhealthy
            return False
