"""What each request does: the application behind the TCP transport (``server``).

The server owns connections (framing, auth state, limits, answer order) and hands every
parsed, authorized request to ``Handler.handle``, which knows the intake, the store and the
admin rules and nothing of sockets, as uvicorn keeps its protocol classes apart from the app.
So the rules are tested without TCP, and a new op is one method and one row in ``_routes``.

``handle`` starts the work at once and returns the answer's fields to await: requests start
in the order they were read, so a pipelining client's sends join one group-commit batch in
order, and the server waits for the answers in that order. A send costs no task (one per
request would add about a tenth to intake's CPU time) and no future of its own: its answer
waits on the intake's future. ping and auth are answered at once; the other ops run as tasks.

The admin ops that requeue or delete (``retry``, ``purge``, ``unsuppress``) pass the per-token
``admin.AdminLimit`` first, the one the dashboard's buttons pass too.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

from notifier.admin import AdminLimit, cancel_job, found, retry_job
from notifier.errors import InvalidRequest, Unavailable
from notifier.intake import Intake
from notifier.models import Enqueued, utcnow
from notifier.protocol import (
    JobRequest,
    JobsRequest,
    PurgeRequest,
    Request,
    RetryRequest,
    SendRequest,
    SuppressionsRequest,
    SuppressRequest,
)
from notifier.store import Store, StoreUnavailable
from notifier.tokens import ANYONE

Fields = dict[str, Any]
#: An op's implementation: the request model ``protocol`` parses for that op (typed ``Any``
#: here because the table holds every op's) to the answer's fields, to await.
Route = Callable[[Any], "Started"]

R = TypeVar("R", bound=Request)

#: The admin ops that requeue or delete, limited per token.
LIMITED_OPS = frozenset({"retry", "purge", "unsuppress"})


def _unavailable(exc: StoreUnavailable) -> Unavailable:
    """A store that cannot be reached is ``unavailable``: the request may succeed on another
    instance or a moment later, which ``internal`` would not tell the client."""
    return Unavailable(f"store unavailable: {exc}")


def _started(
    route: Callable[[Handler, R], Coroutine[Any, Any, Fields]],
) -> Callable[[Handler, R], asyncio.Future[Fields]]:
    """Run an ``async`` route as a task of its own, started now."""

    async def translating(handler: Handler, request: R) -> Fields:
        try:
            return await route(handler, request)
        except StoreUnavailable as exc:
            raise _unavailable(exc) from exc

    @functools.wraps(route)
    def start(handler: Handler, request: R) -> asyncio.Future[Fields]:
        return asyncio.ensure_future(translating(handler, request))

    return start


class _Sent:
    """A send's answer: its batch's future, read into the answer's fields when awaited.

    Not a future of its own: settling one per send by a callback costs a loop callback per
    send, several percent of intake's CPU time.
    """

    __slots__ = ("_committed",)

    def __init__(self, committed: asyncio.Future[Enqueued]) -> None:
        self._committed = committed

    def done(self) -> bool:
        return self._committed.done()

    def __await__(self) -> Generator[Any, None, Fields]:
        try:
            enqueued = yield from self._committed.__await__()
        except StoreUnavailable as exc:
            raise _unavailable(exc) from exc
        fields: Fields = {"id": enqueued.id, "status": "queued"}
        if enqueued.duplicate:
            fields["duplicate"] = True
        return fields


#: A started request: ``done()`` says whether awaiting it would wait.
Started = asyncio.Future[Fields] | _Sent


class Handler:
    def __init__(
        self,
        *,
        intake: Intake,
        store: Store,
        admin_limit: AdminLimit | None = None,
    ) -> None:
        self.intake = intake
        self.store = store
        self.admin_limit = admin_limit or AdminLimit(None)
        self._routes: dict[str, Route] = {
            "send": self._send,
            "status": self._status,
            "cancel": self._cancel,
            "ping": self._nothing,
            "auth": self._nothing,
            "jobs": self._jobs,
            "retry": self._retry,
            "purge": self._purge,
            "suppressions": self._suppressions,
            "suppress": self._suppress,
            "unsuppress": self._unsuppress,
        }

    def handle(self, request: Request, *, caller: str = ANYONE) -> Started:
        """Start ``request``; awaiting the result gives the answer's fields (without ``ok``
        and ``ref``) or raises a NotifierError. A send that is refused, or an admin op over
        ``caller``'s limit, raises here, at once."""
        if request.op in LIMITED_OPS:
            self.admin_limit.admit(request.op, caller)
        return self._routes[request.op](request)

    def _send(self, request: SendRequest) -> _Sent:
        return _Sent(self.intake.put(request))

    @_started
    async def _status(self, request: JobRequest) -> Fields:
        return found(await self.store.get(request.id)).to_status()

    @_started
    async def _cancel(self, request: JobRequest) -> Fields:
        return (await cancel_job(self.store, request.id)).to_status()

    def _nothing(self, request: Request) -> asyncio.Future[Fields]:
        """ping, and auth (the server checked the token: it is per connection)."""
        done: asyncio.Future[Fields] = asyncio.get_running_loop().create_future()
        done.set_result({})
        return done

    @_started
    async def _jobs(self, request: JobsRequest) -> Fields:
        jobs = await self.store.list_jobs(
            status=request.status, since=request.since, limit=request.limit
        )
        return {"jobs": [job.to_status() for job in jobs]}

    @_started
    async def _purge(self, request: PurgeRequest) -> Fields:
        return {"purged": await self.store.purge(before=utcnow() - request.older_than)}

    @_started
    async def _retry(self, request: RetryRequest) -> Fields:
        """Requeue one failed job, or every job failed since a moment; nothing else is retried
        (a delivered job sent again would reach its recipients twice)."""
        if request.id is None and request.since is None:
            raise InvalidRequest("id: give a job id, or since to retry every job failed since")
        if request.id is None:
            return {"ids": await self.store.retry(job_ids=None, since=request.since)}
        return {"ids": await retry_job(self.store, request.id)}

    @_started
    async def _suppressions(self, request: SuppressionsRequest) -> Fields:
        listed = await self.store.list_suppressions()
        return {"suppressions": [entry.to_answer() for entry in listed]}

    @_started
    async def _suppress(self, request: SuppressRequest) -> Fields:
        await self.store.suppress(request.address, request.reason)
        return {}

    @_started
    async def _unsuppress(self, request: SuppressRequest) -> Fields:
        return {"removed": await self.store.unsuppress(request.address)}
