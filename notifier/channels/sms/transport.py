"""The HTTP transport under every SMS provider's ``httpx.AsyncClient``: aiohttp's.

httpx stays the API providers and tests speak (respx mocks it), but its own connection pool
(httpcore) scans every connection on each request, so it costs more per request the more
are in flight; ``httpx-aiohttp`` puts aiohttp's connector under the same client, which
costs a third as much per request (bench/README.md, "Cost per job"). One client, so one
connector, per provider: its keep-alive connections go to that provider's host.

Two things differ from ``httpx_aiohttp.AiohttpTransport`` as it comes:

- failures become the httpx errors they are (its table makes a refused or dropped
  connection a ``ConnectTimeout``): ``ConnectError`` when no connection was made,
  ``RemoteProtocolError`` when the server closed it before answering, timeouts as timeouts;
- no cookie jar: httpx keeps the cookies, a second jar would send them twice.

A POST is never retried by the transport: aiohttp resends on a stale keep-alive connection
only for idempotent methods, so a request the gateway may have received surfaces as a
transient error for the dispatcher's backoff, which ``post`` reports as such.
"""

from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


def _timed_out(cause: TimeoutError, request: httpx.Request) -> httpx.TimeoutException:
    if isinstance(cause, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(cause) or "connect timed out", request=request)
    return httpx.ReadTimeout(str(cause) or "read timed out", request=request)


def _lost(cause: BaseException | None, request: httpx.Request) -> httpx.TransportError | None:
    """The httpx error for an aiohttp failure, or None for one already mapped right."""
    if isinstance(cause, TimeoutError):
        return _timed_out(cause, request)
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(cause), request=request)
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError("server closed the connection", request=request)
    if isinstance(cause, aiohttp.ClientConnectionError):
        return httpx.NetworkError(str(cause), request=request)
    return None


class GatewayTransport(AiohttpTransport):
    """``AiohttpTransport`` with httpx's error classes and without aiohttp's cookie jar."""

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, client=self._session)

    def _session(self) -> aiohttp.ClientSession:
        """Made at the first request, inside the event loop that uses it."""
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.TransportError as exc:
            better = _lost(exc.__cause__, request)
            if better is None:
                raise
            raise better from exc.__cause__
        except TimeoutError as exc:  # aiohttp's own, where the library did not map it
            raise _timed_out(exc, request) from exc
