"""The running service: store, channels, intake, dispatcher and listener, started and
stopped in order (uvicorn's explicit lifecycle).

Start: open the store (taking back work a killed predecessor left in flight), build the
channels once, then listen. Stop: stop accepting and answer what was read, commit what was
accepted, let deliveries finish within the grace period and release the rest, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from datetime import timedelta

from notifier.channels import Channel, load_channels
from notifier.dispatcher import Dispatcher
from notifier.handler import Handler
from notifier.intake import Intake
from notifier.metrics import Metrics
from notifier.models import utcnow
from notifier.ops import OpsApp, OpsServer
from notifier.server import Server
from notifier.settings import Settings
from notifier.store import Store, StoreUnavailable, open_store
from notifier.templates import Templates

log = logging.getLogger("notifier")


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Store = open_store(settings.database_url, settings)
        self.templates = Templates(settings.templates_dir)
        self.channels: dict[str, Channel] = {}
        self.metrics = Metrics()
        self.ops: OpsServer | None = None
        self._dispatching: asyncio.Task[None] | None = None
        self._pruning: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()

    async def start(self) -> None:
        await self.store.open()
        self.channels = load_channels(self.settings)
        for name, channel in self.channels.items():
            if channel.simulated:
                log.warning(
                    "channel %s is NOT SENDING: messages go to the outbox in %s (configure %s)",
                    name,
                    self.settings.outbox_dir.resolve(),
                    "NOTIFIER_SMTP_HOST" if name == "email" else "NOTIFIER_SMS_PROVIDER",
                )
        self.intake = Intake(
            self.store,
            channels=self.channels.keys(),
            templates=self.templates,
            sender=self.settings.smtp_from,
            metrics=self.metrics,
        )
        self.dispatcher = Dispatcher(self.store, self.channels, self.settings, metrics=self.metrics)
        self.server = Server(
            self.settings,
            handler=Handler(intake=self.intake, store=self.store),
            metrics=self.metrics,
        )
        self._dispatching = asyncio.create_task(self.dispatcher.run(), name="dispatcher")
        self._pruning = asyncio.create_task(self._prune_finished(), name="retention")
        await self.server.start()
        if self.settings.http_port:
            app = OpsApp(self.store, self.metrics, lambda: self.server.accepting)
            self.ops = OpsServer(app, host=self.settings.host, port=self.settings.http_port)
            await self.ops.start()
            log.info("operations on http://%s:%d/", self.settings.host, self.ops.port)

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self) -> None:
        grace = self.settings.shutdown_grace
        if self._pruning is not None:
            self._pruning.cancel()
        await self.server.stop(grace)
        await self.intake.drain()
        await self.dispatcher.stop(grace)
        if self._dispatching is not None:
            await self._dispatching
        for channel in self.channels.values():
            await channel.aclose()
        if self.ops is not None:
            await self.ops.stop()
        await self.store.close()
        log.info("stopped")

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT (a second one exits at once), then stop cleanly."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, self.templates.reload)
        await self._stop_requested.wait()
        await self.stop()

    async def _prune_finished(self) -> None:
        """Keep finished jobs NOTIFIER_RETENTION_DAYS days, checking hourly."""
        keep = timedelta(days=self.settings.retention_days)
        while True:
            try:
                purged = await self.store.purge(before=utcnow() - keep)
            except StoreUnavailable as exc:
                log.warning("retention: store unavailable: %s", exc)
            else:
                if purged:
                    log.info("retention: purged %d finished jobs", purged)
            await asyncio.sleep(3600)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_requested.is_set():
            # At once means without waiting for anything, threads included: what was in
            # flight is taken up again at the next start (or by another instance).
            log.warning("%s again: exiting now", sig.name)
            logging.shutdown()
            os._exit(1)
        log.info("%s: shutting down (send it again to exit at once)", sig.name)
        self._stop_requested.set()
