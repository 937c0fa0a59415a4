"""The heartbeat: a thread with its own event loop and its own connection, outside the pool.

Other instances take over this one's deliveries in flight when its heartbeat stops for
``instance_dead_after``. Beating from the service's event loop through the shared pool made
liveness mean "the loop was free and so was a pooled connection": a busy loop or an exhausted
pool let another instance take over live work and send it twice. Here a beat needs only the
process and the database. A process whose loop is stuck for good still loses its work when
its leases run out, because a stuck loop extends none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import asyncpg

from notifier.store.postgres.listener import Connect

log = logging.getLogger("notifier.store.postgres")

#: ``(owner)``: true when the row is new, i.e. the instance was presumed dead and reaped.
BEAT = (
    "INSERT INTO instances (owner) VALUES ($1) ON CONFLICT (owner)"
    " DO UPDATE SET heartbeat_at = now() RETURNING started_at = heartbeat_at"
)


class Heartbeat:
    """Beats for ``owner`` every ``interval`` from ``start`` until ``stop``."""

    def __init__(
        self,
        connect: Connect,
        owner: str,
        *,
        interval: float,
        dead_after: float,
        errors: tuple[type[BaseException], ...],
    ) -> None:
        self._connect = connect
        self._owner = owner
        self._interval = interval
        self._dead_after = dead_after
        self._errors = errors
        self._reachable_since: float | None = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._run(), name="postgres-heartbeat")
        self.thread = threading.Thread(target=self._main, name="postgres-heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def reachable_for(self) -> float:
        """Seconds since the heartbeat last got through after a failure (or since the start);
        0 while it fails. Safe to read from any thread."""
        since = self._reachable_since
        return 0.0 if since is None else time.monotonic() - since

    async def stop(self, timeout: float) -> None:
        """Cancel the beating and wait (without blocking the caller's loop) for the thread."""
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                self._loop.call_soon_threadsafe(self._task.cancel)
        await asyncio.to_thread(self.thread.join, timeout)
        if self.thread.is_alive():
            log.warning("heartbeat: the thread did not stop within %gs", timeout)

    def _main(self) -> None:
        loop = self._loop
        try:
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    async def _run(self) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while True:
                await asyncio.sleep(self._interval)
                try:
                    if conn is None:
                        conn = await self._connect()
                    first = await conn.fetchval(BEAT, self._owner)
                except self._errors as exc:
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    if self._reachable_since is not None:
                        log.warning("heartbeat: store unavailable: %s", exc)
                    self._reachable_since = None
                    continue
                if self._reachable_since is None:
                    log.info("heartbeat: store reachable again")
                    self._reachable_since = time.monotonic()
                if first:
                    log.warning(
                        "instance %s was presumed dead (no heartbeat for %gs): its deliveries in"
                        " flight were handed to other instances and may be sent twice",
                        self._owner,
                        self._dead_after,
                    )
        finally:
            if conn is not None:
                with contextlib.suppress(*self._errors):
                    await conn.close(timeout=self._interval)
