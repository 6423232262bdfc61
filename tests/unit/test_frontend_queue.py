"""The frontend's queue (issue 19): requests wait while every decode node is full, in arrival order,
bounded in number and in time; and `NodeSet.full`, the signal it waits on."""

from __future__ import annotations

import asyncio

import pytest

from pd_serve.frontend.config import FrontendConfig
from pd_serve.frontend.nodes import Node, NodeSet
from pd_serve.frontend.queueing import DecodeQueue, QueueRefusal


class Room:
    def __init__(self) -> None:
        self.free = False

    def __call__(self) -> bool:
        return self.free


def test_a_request_goes_straight_on_while_a_node_has_room() -> None:
    room = Room()
    room.free = True
    queue = DecodeQueue(max_queued=0, timeout=1.0, has_room=room)
    assert asyncio.run(queue.wait_turn()) == 0.0 and queue.depth == 0


def test_waiters_go_in_arrival_order_once_there_is_room() -> None:
    async def scenario() -> list[int]:
        room = Room()
        queue = DecodeQueue(max_queued=8, timeout=30.0, has_room=room)
        order: list[int] = []

        async def client(i: int) -> None:
            await queue.wait_turn()
            order.append(i)

        tasks = [asyncio.create_task(client(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert queue.depth == 3 and order == []
        room.free = True
        queue.wake()
        await asyncio.gather(*tasks)
        assert queue.depth == 0 and queue.admitted_after_wait == 3
        return order

    assert asyncio.run(scenario()) == [0, 1, 2]


def test_past_the_limit_a_request_is_refused_at_once_and_a_long_wait_times_out() -> None:
    async def scenario() -> None:
        queue = DecodeQueue(max_queued=1, timeout=0.2, has_room=Room())
        first = asyncio.create_task(queue.wait_turn())
        await asyncio.sleep(0.01)
        with pytest.raises(QueueRefusal, match="--max-queued-requests"):
            await queue.wait_turn()
        with pytest.raises(QueueRefusal, match="--queue-timeout"):
            await first
        assert queue.depth == 0 and queue.refused == 2

    asyncio.run(scenario())


def test_a_client_that_leaves_while_queued_leaves_no_waiter() -> None:
    async def scenario() -> None:
        queue = DecodeQueue(max_queued=4, timeout=30.0, has_room=Room())
        task = asyncio.create_task(queue.wait_turn())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert queue.depth == 0

    asyncio.run(scenario())


def test_a_node_that_reported_a_queue_is_full_until_one_of_ours_there_ends() -> None:
    async def scenario() -> None:
        nodes = NodeSet(FrontendConfig(decode_urls=("http://d:1",)))
        woken: list[int] = []
        nodes.load_listeners.append(lambda: woken.append(1))
        guards = [nodes.load.acquire("d") for _ in range(3)]
        nodes.replace_all([Node("d", "decode", "http://d:1", reported_queued=2)])
        node = nodes.nodes["d"]
        assert nodes.full(node)
        before = len(woken)
        guards[0].release()  # one of ours ended there: the node has room for one more
        assert not nodes.full(node) and len(woken) == before + 1
        guards.append(nodes.load.acquire("d"))
        assert nodes.full(node)
        nodes.replace_all([Node("d", "decode", "http://d:1", reported_queued=0)])  # its queue drained
        assert not nodes.full(nodes.nodes["d"])
        for g in guards:
            g.release()

    asyncio.run(scenario())
