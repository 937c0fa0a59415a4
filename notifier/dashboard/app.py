"""The dashboard's pages and actions, served by the operations app beside /healthz.

Everything it shows comes from the store interface and the service's own metrics and
circuits; retry and cancel apply the same rules as the protocol's ops (``notifier.admin``).
Every visitor gets a signed session cookie: when the service asks for tokens
(NOTIFIER_AUTH_TOKENS) the session must be signed in with one of them to see anything,
and every POST carries the CSRF token of its session either way.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from notifier.admin import AdminLimit, cancel_job, found, retry_job
from notifier.channels.circuit import CircuitBreaker
from notifier.dashboard import chart
from notifier.dashboard.sessions import COOKIE, MAX_AGE, Session, Sessions
from notifier.errors import ErrorCode, InvalidRequest, NotifierError
from notifier.metrics import Metrics
from notifier.models import JobSearch, JobStatus, Priority, isoformat, utcnow
from notifier.store import Store, StoreUnavailable
from notifier.tokens import ANYONE

GET = ["GET", "HEAD"]
POST = ["POST"]
#: Most jobs one search or list shows.
PAGE = 100
_HTTP_STATUS = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.RATE_LIMITED: 429,
}
#: The jobs page's search form, as ``search_of`` reads it.
_SEARCH_FIELDS = ("id", "recipient", "key", "status", "from", "until")

Context = dict[str, Any]
#: A page: the request to its template's name and context.
View = Callable[[Request], Awaitable[tuple[str, Context]]]
#: A POST on a job: the request and job id to where the browser goes next.
#: A button's work: who pressed it (the session's caller) and the job; where to go next.
Action = Callable[[str, str], Awaitable[str]]
Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class ProviderRow:
    name: str
    circuit: str | None
    delivered: int
    failed: int
    retried: int

    @property
    def error_rate(self) -> float | None:
        """Failed attempts (for good or to be retried) of all attempts, since start."""
        attempts = self.delivered + self.failed + self.retried
        return (self.failed + self.retried) / attempts if attempts else None


def provider_rows(metrics: Metrics, circuits: Sequence[CircuitBreaker]) -> list[ProviderRow]:
    """Each provider's circuit and its outcomes as this instance's counters have them."""
    counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for kind, counter in (
        ("delivered", metrics.delivered),
        ("failed", metrics.failed),
        ("retried", metrics.retried),
    ):
        for family in counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["provider"]][kind] += int(sample.value)
    states = {c.name: c.state.name.lower().replace("_", "-") for c in circuits}
    return [
        ProviderRow(
            name,
            states.get(name),
            counts[name]["delivered"],
            counts[name]["failed"],
            counts[name]["retried"],
        )
        for name in sorted(set(counts) | set(states))
    ]


def _moment(request: Request, name: str) -> datetime | None:
    """A ``datetime-local`` field (UTC) or an RFC 3339 moment; empty is None."""
    value = request.query_params.get(name, "").strip()
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{name}: {value!r} is not a date and time such as 2026-12-02T14:30"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def search_of(request: Request) -> JobSearch:
    """The search the jobs page's form asks for; a field it cannot read is InvalidRequest."""
    text = {
        name: request.query_params.get(name, "").strip() or None
        for name in ("id", "recipient", "key", "status")
    }
    status = None
    if text["status"] is not None:
        try:
            status = JobStatus(text["status"])
        except ValueError:
            choices = ", ".join(s.value for s in JobStatus)
            raise InvalidRequest(f"status: {text['status']!r} is not one of {choices}") from None
    return JobSearch(
        job_id=text["id"],
        recipient=text["recipient"],
        idempotency_key=text["key"],
        status=status,
        created_from=_moment(request, "from"),
        created_until=_moment(request, "until"),
        limit=PAGE,
    )


class Dashboard:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        tokens: Sequence[SecretStr],
        admin_limit: AdminLimit | None = None,
        circuits: Sequence[CircuitBreaker],
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.circuits = circuits
        self.admin_limit = admin_limit or AdminLimit(None)
        self.sessions = Sessions(tokens)
        self._templates = Environment(
            loader=PackageLoader("notifier.dashboard"),
            autoescape=select_autoescape(default=True),
        )
        self._templates.filters["moment"] = lambda at: isoformat(at) if at else ""

    @property
    def routes(self) -> list[BaseRoute]:
        """To sit in the operations app's own routes, so /healthz keeps answering 405 to a
        POST (a mount on ``/`` would take every path)."""
        static = StaticFiles(packages=[("notifier.dashboard", "static")])
        return [
            Route("/", self._view(self._overview), methods=GET),
            Route("/login", self._login_form, methods=GET),
            Route("/login", self._login, methods=POST),
            Route("/logout", self._logout, methods=POST),
            Route("/jobs", self._view(self._jobs), methods=GET),
            Route("/jobs/failed", self._view(self._failed), methods=GET),
            Route("/jobs/{job_id}", self._view(self._job), methods=GET),
            Route("/jobs/{job_id}/retry", self._action(self._retry), methods=POST),
            Route("/jobs/{job_id}/cancel", self._action(self._cancel), methods=POST),
            Mount("/static", static, name="static"),
        ]

    # -- sessions ----------------------------------------------------------------------------

    def _session(self, request: Request) -> Session:
        found_session = self.sessions.read(request.cookies.get(COOKIE))
        return found_session or self.sessions.start(caller=None)

    def _keep(self, response: Response, request: Request, session: Session) -> Response:
        if session.new:
            response.set_cookie(
                COOKIE,
                self.sessions.cookie(session),
                max_age=MAX_AGE,
                path="/",
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return response

    def _render(
        self, request: Request, session: Session, template: str, context: Context, status: int
    ) -> Response:
        page = self._templates.get_template(template).render(
            **context,
            csrf=self.sessions.csrf(session),
            sign_out=self.sessions.required and session.signed_in,
        )
        return self._keep(HTMLResponse(page, status), request, session)

    def _problem(self, request: Request, session: Session, exc: Exception) -> Response:
        if isinstance(exc, NotifierError):
            status, message = _HTTP_STATUS.get(ErrorCode(exc.code), 400), exc.message
        else:
            status, message = 503, f"store unavailable: {exc}"
        return self._render(request, session, "problem.html", {"message": message}, status)

    def _view(self, view: View) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            session = self._session(request)
            if not session.signed_in:
                return self._keep(RedirectResponse("/login", 303), request, session)
            try:
                template, context = await view(request)
            except (NotifierError, StoreUnavailable) as exc:
                return self._problem(request, session, exc)
            return self._render(request, session, template, context, 200)

        return endpoint

    def _action(self, action: Action) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            session = self._session(request)
            form = await request.form()
            csrf = form.get("csrf")
            if not session.signed_in or not self.sessions.csrf_ok(
                session, csrf if isinstance(csrf, str) else None
            ):
                return self._render(
                    request,
                    session,
                    "problem.html",
                    {"message": "csrf: the form is stale or not from this session; reload it"},
                    403,
                )
            try:
                where = await action(session.caller or ANYONE, request.path_params["job_id"])
            except (NotifierError, StoreUnavailable) as exc:
                return self._problem(request, session, exc)
            return RedirectResponse(where, 303)

        return endpoint

    async def _login_form(self, request: Request) -> Response:
        session = self._session(request)
        if session.signed_in:
            return self._keep(RedirectResponse("/", 303), request, session)
        return self._render(request, session, "login.html", {"message": None}, 200)

    async def _login(self, request: Request) -> Response:
        session = self._session(request)
        form = await request.form()
        token, csrf = form.get("token"), form.get("csrf")
        if not self.sessions.csrf_ok(session, csrf if isinstance(csrf, str) else None):
            message = "csrf: the form is stale or not from this session; reload it"
            return self._render(request, session, "login.html", {"message": message}, 403)
        caller = self.sessions.caller(token) if isinstance(token, str) else None
        if caller is None:
            return self._render(
                request, session, "login.html", {"message": "token: not valid"}, 401
            )
        signed_in = self.sessions.start(caller=caller)
        return self._keep(RedirectResponse("/", 303), request, signed_in)

    async def _logout(self, request: Request) -> Response:
        session = self._session(request)
        form = await request.form()
        csrf = form.get("csrf")
        if not self.sessions.csrf_ok(session, csrf if isinstance(csrf, str) else None):
            return self._render(
                request, session, "problem.html", {"message": "csrf: reload the page"}, 403
            )
        anonymous = self.sessions.start(caller=None)
        return self._keep(RedirectResponse("/login", 303), request, anonymous)

    # -- pages -------------------------------------------------------------------------------

    async def _overview(self, request: Request) -> tuple[str, Context]:
        now = utcnow()
        minutes = await self.store.outcomes_per_minute(chart.start_of_window(now))
        waiting = await self.store.count_waiting()
        channels = sorted({channel for channel, _ in waiting})
        return "overview.html", {
            "counts": await self.store.count_by_status(),
            "waiting": waiting,
            "channels": channels,
            "priorities": list(Priority),
            "chart": chart.chart(minutes, now),
            "providers": provider_rows(self.metrics, self.circuits),
            "backlog": await self.store.callback_backlog(),
            "now": now,
        }

    async def _jobs(self, request: Request) -> tuple[str, Context]:
        form = {name: request.query_params.get(name, "") for name in _SEARCH_FIELDS}
        search = search_of(request)
        return "jobs.html", {
            "form": form,
            "statuses": [s.value for s in JobStatus],
            "jobs": await self.store.search_jobs(search),
        }

    async def _failed(self, request: Request) -> tuple[str, Context]:
        return "failed.html", {"jobs": await self.store.recent_failures(PAGE)}

    async def _job(self, request: Request) -> tuple[str, Context]:
        job = found(await self.store.get(request.path_params["job_id"]))
        return "job.html", {"job": job}

    # -- actions -----------------------------------------------------------------------------

    async def _retry(self, caller: str, job_id: str) -> str:
        self.admin_limit.admit("retry", caller)
        await retry_job(self.store, job_id)
        return f"/jobs/{job_id}"

    async def _cancel(self, caller: str, job_id: str) -> str:
        await cancel_job(self.store, job_id)
        return f"/jobs/{job_id}"
