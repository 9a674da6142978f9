"""A blocking Conveyor client for scripts and notebooks: `ConveyorClient` without asyncio.

    from conveyor.client.sync import SyncConveyorClient

    with SyncConveyorClient() as conveyor:
        job = conveyor.submit("claude-sonnet-4-5", "Write a haiku.", max_tokens=128)
        for event in conveyor.watch(job.id):     # a plain iterator
            ...
        final = conveyor.wait(job.id, timeout=60)

Each method is the `ConveyorClient` method of the same name and arguments, returning
its result; async iterators (`watch`, `watch_jobs`, `iter_jobs`) become iterators.
Errors are the same `ConveyorError` classes. The async client runs on a private
event loop in a daemon thread owned by this object, so it works where an event loop
already runs in the calling thread (Jupyter) and from several threads at once.
`close()` (or leaving the `with` block) closes the channels and stops the thread.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from conveyor.client import ConveyorClient

__all__ = ["SyncConveyorClient"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _blocking(
    method: Callable[Concatenate[ConveyorClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncConveyorClient, P], R]:
    """The blocking form of an async ConveyorClient method."""

    @functools.wraps(method)
    def call(self: SyncConveyorClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self._client, *args, **kwargs))

    return call


def _iterating(
    method: Callable[Concatenate[ConveyorClient, P], AsyncIterator[T]],
) -> Callable[Concatenate[SyncConveyorClient, P], Iterator[T]]:
    """The iterator form of an async-iterator ConveyorClient method."""

    @functools.wraps(method)
    def call(self: SyncConveyorClient, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._iterate(method(self._client, *args, **kwargs))

    return call


def _shutdown(
    client: ConveyorClient, loop: asyncio.AbstractEventLoop, thread: threading.Thread
) -> None:
    """Close the client's channels on its loop, then stop the loop and its thread."""
    try:
        asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


async def _next(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class SyncConveyorClient:
    """Blocking client of the gateway and the notifier; arguments as `ConveyorClient`."""

    def __init__(
        self,
        gateway: str | None = None,
        notifier: str | None = None,
        *,
        api_key: str | None = None,
        secure: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
        rpc_timeout: float | None = 30.0,
    ) -> None:
        self._client = ConveyorClient(
            gateway,
            notifier,
            api_key=api_key,
            secure=secure,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            rpc_timeout=rpc_timeout,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="conveyor-sync-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        self._lock = threading.Lock()
        # Closes the channels and stops the thread when the client is dropped unclosed
        # (or at exit); it holds no reference to `self`.
        self._shutdown = weakref.finalize(self, _shutdown, self._client, self._loop, self._thread)

    def __repr__(self) -> str:  # never shows the key
        return "Sync" + repr(self._client)

    @property
    def gateway(self) -> str:
        return self._client.gateway

    @property
    def notifier(self) -> str:
        return self._client.notifier

    # -- lifecycle

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close both channels and stop the loop's thread. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._shutdown()

    def _run(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run `coro` on the client's loop and wait for its result (or its error)."""
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        future: Future[R] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C (or another interruption) stops the call too
            raise

    def _iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """Items of an async iterator running on the client's loop, one call per item;
        leaving the loop early closes the async iterator (and so its stream)."""
        try:
            while True:
                try:
                    yield self._run(_next(iterator))
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._run(_close(iterator))

    # -- the methods of ConveyorClient, in the same order

    submit = _blocking(ConveyorClient.submit)
    # (its **params could name `self`, which the wrapper passes by position: no clash)
    create = _blocking(ConveyorClient.create)  # type: ignore[arg-type]
    submit_request = _blocking(ConveyorClient.submit_request)
    submit_many = _blocking(ConveyorClient.submit_many)
    get = _blocking(ConveyorClient.get)
    list = _blocking(ConveyorClient.list)
    iter_jobs = _iterating(ConveyorClient.iter_jobs)
    cancel = _blocking(ConveyorClient.cancel)
    retry = _blocking(ConveyorClient.retry)
    stats = _blocking(ConveyorClient.stats)
    history = _blocking(ConveyorClient.history)
    watch = _iterating(ConveyorClient.watch)
    watch_jobs = _iterating(ConveyorClient.watch_jobs)
    wait = _blocking(ConveyorClient.wait)
    create_schedule = _blocking(ConveyorClient.create_schedule)
    get_schedule = _blocking(ConveyorClient.get_schedule)
    list_schedules = _blocking(ConveyorClient.list_schedules)
    pause_schedule = _blocking(ConveyorClient.pause_schedule)
    resume_schedule = _blocking(ConveyorClient.resume_schedule)
    delete_schedule = _blocking(ConveyorClient.delete_schedule)
    delete = _blocking(ConveyorClient.delete)
    set_priority = _blocking(ConveyorClient.set_priority)
    job_filter = staticmethod(ConveyorClient.job_filter)
    cancel_jobs = _blocking(ConveyorClient.cancel_jobs)
    retry_jobs = _blocking(ConveyorClient.retry_jobs)
    redrive_dead = _blocking(ConveyorClient.redrive_dead)
    pause_lane = _blocking(ConveyorClient.pause_lane)
    resume_lane = _blocking(ConveyorClient.resume_lane)
    lane_pauses = _blocking(ConveyorClient.lane_pauses)
    workers = _blocking(ConveyorClient.workers)
    drain_worker = _blocking(ConveyorClient.drain_worker)
