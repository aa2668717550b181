"""The EHR pool's gate: at most the pool's size of requests in flight (each until its body is closed), the
rest wait in order; a wait longer than the pool timeout is httpx.PoolTimeout; every slot comes back."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.http_gate import GatedTransport


class SlowServer(httpx.AsyncBaseTransport):
    """Answers after a pause and counts how many requests it holds at once (until their bodies close)."""

    def __init__(self, pause: float = 0.02) -> None:
        self.pause = pause
        self.open = 0
        self.most_open = 0
        self.fail_on: set[str] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await asyncio.sleep(self.pause)
            if request.url.path in self.fail_on:
                raise httpx.ConnectError("refused", request=request)
        except BaseException:
            self.open -= 1
            raise
        server = self

        class Body(httpx.AsyncByteStream):
            async def __aiter__(self):
                yield b'{"resourceType": "Patient"}'

            async def aclose(self) -> None:
                server.open -= 1

        return httpx.Response(200, stream=Body())


async def test_no_more_than_the_pool_size_reach_the_pool_and_all_answer() -> None:
    server = SlowServer()
    async with httpx.AsyncClient(transport=GatedTransport(server, max_in_flight=3)) as client:
        answers = await asyncio.gather(*(client.get(f"http://ehr.test/fhir/Patient/{n}") for n in range(20)))
    assert [answer.json()["resourceType"] for answer in answers] == ["Patient"] * 20
    assert server.most_open == 3
    assert server.open == 0


async def test_a_streamed_response_holds_its_slot_until_closed() -> None:
    server = SlowServer(pause=0)
    transport = GatedTransport(server, max_in_flight=1)
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, pool=0.2)) as client:
        held = await client.send(client.build_request("GET", "http://ehr.test/a"), stream=True)
        with pytest.raises(httpx.PoolTimeout):
            await client.get("http://ehr.test/b")  # the only slot is held by the open body
        await held.aclose()
        assert (await client.get("http://ehr.test/c")).status_code == 200


async def test_a_failed_request_gives_its_slot_back() -> None:
    server = SlowServer(pause=0)
    server.fail_on = {"/down"}
    async with httpx.AsyncClient(transport=GatedTransport(server, max_in_flight=1)) as client:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                await client.get("http://ehr.test/down")
        assert (await client.get("http://ehr.test/up")).status_code == 200


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    server = SlowServer(pause=0.2)
    async with httpx.AsyncClient(transport=GatedTransport(server, max_in_flight=1)) as client:
        first = asyncio.create_task(client.get("http://ehr.test/1"))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(client.get("http://ehr.test/2"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (await first).status_code == 200
        assert (await asyncio.wait_for(client.get("http://ehr.test/3"), timeout=5)).status_code == 200


def test_the_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        GatedTransport(SlowServer(), max_in_flight=0)
