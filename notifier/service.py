"""The running service: store, channels, intake, dispatcher and listener, started and
stopped in order (uvicorn's explicit lifecycle).

Start builds every channel first, so that each configuration mistake is refused before
anything opens; then it opens the store (taking back work a killed predecessor left in
flight), the operations listener, the background loops and the listener. Each part that
starts registers its own stop on one ``AsyncExitStack``, so stopping, and a start that fails
half way, run the same stops in reverse: stop accepting and answer what was read, commit what
was accepted, let deliveries finish within the grace period and release the rest, then close
the operations listener, the store and the channels.

A new background loop is one more ``stack.enter_async_context(background(...))`` in
``start``, between the store it needs and the listener that feeds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any

from notifier.admin import AdminLimit
from notifier.bounces import Bounce, BounceReader
from notifier.callbacks import Callbacks
from notifier.channels import Channel
from notifier.channels.mime import job_id_of
from notifier.channels.registry import channel_factories
from notifier.channels.sms.base import ProviderConfig
from notifier.dashboard import Dashboard
from notifier.dispatcher import Dispatcher
from notifier.handler import Handler
from notifier.intake import Intake
from notifier.metrics import Metrics
from notifier.models import ReceiptReport, ReceiptState, utcnow
from notifier.ops import HTTPServer, OpsApp
from notifier.receipts import DeliveryReport, ReceiptsApp
from notifier.server import Server
from notifier.settings import Settings, SettingsError
from notifier.store import Store, StoreUnavailable, open_store
from notifier.templates import Templates

log = logging.getLogger("notifier")


@contextlib.asynccontextmanager
async def background(
    name: str,
    loop: Coroutine[Any, Any, None],
    *,
    stop: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``loop`` as a task for the life of the block; on exit ask it to ``stop`` (cancel
    it when there is no gentler way) and wait for it, raising what it died of."""
    task = asyncio.create_task(loop, name=name)
    try:
        yield task
    finally:
        try:
            if stop is None:
                task.cancel()
            else:
                await stop()
        finally:
            await asyncio.wait([task])
        if not task.cancelled():
            task.result()


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            self.store: Store = open_store(settings)
        except ValueError as exc:  # the backend refuses its URL, naming the variable
            raise SettingsError(str(exc)) from None
        self.templates = Templates(settings.templates_dir)
        self.channels: dict[str, Channel] = {}
        self.metrics = Metrics()
        #: One limit for the admin ops, whether they come over TCP or from the dashboard.
        self.admin_limit = AdminLimit(settings.admin_rate_limit)
        self.ops: HTTPServer | None = None
        self._stack = contextlib.AsyncExitStack()
        self._stop_requested = asyncio.Event()

    async def start(self) -> None:
        """Start each part in turn; if one fails, stop those already started and raise."""
        async with contextlib.AsyncExitStack() as stack:
            self.channels = await self._build_channels(stack)
            self.intake = Intake(
                self.store,
                channels=self.channels.keys(),
                templates=self.templates,
                sender=self.settings.smtp_from,
                metrics=self.metrics,
                checks={name: channel.check for name, channel in self.channels.items()},
                callback_url=self.settings.callback_url,
            )
            self.dispatcher = Dispatcher(
                self.store, self.channels, self.settings, metrics=self.metrics
            )
            self.callbacks = Callbacks(
                self.store, self.settings, metrics=self.metrics, owner=self.dispatcher.owner
            )
            self.server = Server(
                self.settings,
                handler=Handler(
                    intake=self.intake,
                    store=self.store,
                    admin_limit=self.admin_limit,
                ),
                metrics=self.metrics,
            )
            await self.store.open()
            stack.push_async_callback(self.store.close)
            await self._start_ops(stack)
            grace = self.settings.shutdown_grace
            # Callbacks stop after the dispatcher, to post the events its last deliveries made.
            await stack.enter_async_context(
                background(
                    "callbacks", self.callbacks.run(), stop=lambda: self.callbacks.stop(grace)
                )
            )
            await stack.enter_async_context(
                background(
                    "dispatcher", self.dispatcher.run(), stop=lambda: self.dispatcher.stop(grace)
                )
            )
            await stack.enter_async_context(background("retention", self._prune_finished()))
            await self._start_bounces(stack)
            await self._start_receipts(stack)
            stack.push_async_callback(self.intake.drain)
            await self.server.start()
            stack.push_async_callback(self.server.stop, grace)
            self._stack = stack.pop_all()

    async def _build_channels(self, stack: contextlib.AsyncExitStack) -> dict[str, Channel]:
        """Every channel, or one ``SettingsError`` naming what each refused channel lacks."""
        channels: dict[str, Channel] = {}
        problems: list[str] = []
        for name, factory in channel_factories().items():
            try:
                channel = factory(self.settings)
            except SettingsError as exc:
                problems.extend(exc.problems)
                continue
            stack.push_async_callback(channel.aclose)
            self.metrics.track_circuits(channel.circuits)
            self.metrics.watch_smtp_windows(channel.windows)
            channels[name] = channel
        if problems:
            raise SettingsError(*problems)
        for name, channel in channels.items():
            if channel.simulated:
                log.warning(
                    "channel %s is NOT SENDING: messages go to the outbox in %s (configure %s)",
                    name,
                    self.settings.outbox_dir.resolve(),
                    "NOTIFIER_SMTP_HOST" if name == "email" else "NOTIFIER_SMS_PROVIDER",
                )
        return channels

    async def _start_ops(self, stack: contextlib.AsyncExitStack) -> None:
        if not self.settings.http_port:
            return
        dashboard = Dashboard(
            self.store,
            self.metrics,
            tokens=self.settings.auth_tokens,
            admin_limit=self.admin_limit,
            circuits=[c for channel in self.channels.values() for c in channel.circuits],
        )
        app = OpsApp(self.store, self.metrics, lambda: self.server.accepting, dashboard)
        self.ops = HTTPServer(
            app, host=self.settings.host, port=self.settings.http_port, name="ops-http"
        )
        await self.ops.start()
        stack.push_async_callback(self.ops.stop)
        log.info("operations on http://%s:%d/", self.settings.host, self.ops.port)

    async def _start_receipts(self, stack: contextlib.AsyncExitStack) -> None:
        """The listener providers push delivery reports to, apart from the ops port."""
        if not self.settings.receipts_port:
            return
        settings = self.settings
        app = ReceiptsApp(
            self._record_reports,
            self.metrics,
            public_url=settings.receipts_public_url,
            twilio_auth_token=ProviderConfig.of(settings, "twilio").api_key,
            webhook_key=ProviderConfig.of(settings, "webhook").api_key,
            max_body_bytes=settings.receipts_max_body_bytes,
            rate_limit=settings.receipts_rate_limit,
            rate_burst=settings.receipts_rate_burst,
        )
        self.receipts = HTTPServer(
            app, host=settings.host, port=settings.receipts_port, name="receipts-http"
        )
        await self.receipts.start()
        stack.push_async_callback(self.receipts.stop)
        log.info("receipts on http://%s:%d/receipts/", settings.host, self.receipts.port)

    async def _record_reports(self, reports: list[DeliveryReport]) -> None:
        """Providers' reports into the store; raising makes the provider send them again."""
        matched = await self.store.record_receipts(
            [
                ReceiptReport(r.reference, r.by, r.recipient, ReceiptState(r.state), r.reason, r.at)
                for r in reports
            ]
        )
        for report, found in zip(reports, matched, strict=True):
            if not found:
                log.info(
                    "receipt from %s for %s %s matches no sent message yet; kept for it",
                    report.provider,
                    report.by,
                    report.reference,
                )

    async def _start_bounces(self, stack: contextlib.AsyncExitStack) -> None:
        mailbox = self.settings.bounce_mailbox_config()
        if mailbox is None:
            return
        reader = BounceReader(
            mailbox,
            self._record_bounces,
            interval=self.settings.bounce_poll_interval,
            exclusive=lambda: self.store.exclusive("bounces"),
        )
        await stack.enter_async_context(reader.running())

    async def _record_bounces(self, bounces: list[Bounce]) -> None:
        now = utcnow()
        await self.store.record_receipts(
            [
                ReceiptReport(
                    job_id_of(b.message_id),
                    "job_id",
                    b.recipient,
                    ReceiptState.BOUNCED,
                    b.reason,
                    now,
                )
                for b in bounces
            ]
        )

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self) -> None:
        """Run the stops ``start`` registered, last started first; a second call does nothing."""
        await self._stack.aclose()
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
