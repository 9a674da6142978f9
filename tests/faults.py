"""A TCP proxy that a test puts between one service and Postgres (or RabbitMQ) to inject
network faults on that link only, leaving the machine's servers alone.

    with FaultProxy("127.0.0.1", 5432) as proxy:
        url = proxy.url(database_url)         # the same URL, through the proxy
        stack.start("worker", CONVEYOR_DATABASE_URL=url)
        proxy.stall()    # bytes are held, connections stay open (a hung network)
        proxy.restore()  # held bytes flow again
        proxy.cut()      # connections are closed, new ones closed at once (server gone)
        proxy.restore()

The proxy runs its own event loop in a thread, so it keeps forwarding while the test's
loop is blocked (e.g. in `Stack.start`, waiting for a service that needs the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, TypeVar

from sqlalchemy.engine import make_url

T = TypeVar("T")
Mode = Literal["open", "stalled", "cut"]
CHUNK = 64 * 1024


class FaultProxy:
    """Forwards 127.0.0.1:<port> to target_host:target_port; `stall`, `cut`, `restore`."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.mode: Mode = "open"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- control (from the test's thread)

    def start(self) -> int:
        """Listen; returns the port."""
        self._thread.start()
        self._call(self._start())
        return self.port

    def url(self, url: str) -> str:
        """`url` (a database or broker URL) with its host and port replaced by the proxy's."""
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(False)

    def stall(self) -> None:
        """Hold every byte in both directions; connections stay open, new ones hang."""
        self._call(self._set("stalled"))

    def cut(self) -> None:
        """Close every connection; new ones are closed as soon as they are accepted."""
        self._call(self._set("cut"))

    def restore(self) -> None:
        """Forward again (bytes held by a stall go through)."""
        self._call(self._set("open"))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # -- the proxy (in its own thread)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _set(self, mode: Mode) -> None:
        assert self._flowing is not None
        self.mode = mode
        if mode == "stalled":
            self._flowing.clear()
            return
        if mode == "cut":
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()
        self._flowing.set()

    async def _stop(self) -> None:
        await self._set("cut")
        if self._server is not None:
            self._server.close()

    def _is_cut(self) -> bool:
        return self.mode == "cut"

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        if self._is_cut():
            client_w.transport.abort()
            return
        await self._flowing.wait()  # a stalled network: the connection hangs
        if self._is_cut():
            client_w.transport.abort()
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, server_w}
        try:
            await asyncio.gather(self._pump(client_r, server_w), self._pump(server_r, client_w))
        finally:
            for w in (client_w, server_w):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(CHUNK):
                await self._flowing.wait()
                if writer.transport.is_closing():
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
