"""The load generators of the HTTP benchmarks (``--client``): one keep-alive session, ``post(url, body)``.

aiohttp (C HTTP parser) costs the client about a fifth of httpx's CPU per request: against a
trivial server on this 2-core machine one client process reaches ~9,200 req/s at concurrency 8 with
aiohttp and ~1,330 with httpx. The servers share those cores, so the client's CPU is the servers'
loss, and a dear client also adds its own time to every latency measured.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

CLIENTS = ("aiohttp", "httpx")

Post = Callable[[str, bytes], Awaitable["Answer"]]


class Answer:
    """What a benchmark needs of a response: its status and its body."""

    __slots__ = ("status", "body")

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body


@contextlib.asynccontextmanager
async def http_client(
    kind: str, concurrency: int, timeout_s: float = 60.0
) -> AsyncIterator[tuple[Post, tuple[type[BaseException], ...]]]:
    """``post(url, body) -> Answer`` (a JSON POST) over ``concurrency`` keep-alive connections of a
    ``kind`` client (:data:`CLIENTS`), and the transport errors it raises."""
    from pcee.serving.auth import bearer_header, client_token
    from pcee.settings import Settings

    # the service's token where one is set (make up's env.sh): /predict needs it with PCEE_SERVE_TOKEN_PREDICT
    headers = {"content-type": "application/json", **bearer_header(client_token(Settings()))}
    if kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as hc:

            async def post_httpx(url: str, body: bytes) -> Answer:
                r = await hc.post(url, content=body, headers=headers)
                return Answer(r.status_code, r.content)

            yield post_httpx, (httpx.HTTPError,)
        return
    if kind != "aiohttp":
        raise ValueError(f"unknown client {kind!r}; one of {', '.join(CLIENTS)}")
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:

        async def post_aiohttp(url: str, body: bytes) -> Answer:
            async with session.post(url, data=body, headers=headers) as r:
                return Answer(r.status, await r.read())

        yield post_aiohttp, (aiohttp.ClientError, asyncio.TimeoutError)
