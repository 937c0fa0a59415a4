"""The HTTP transport under every SMS provider's ``httpx.AsyncClient``: aiohttp's.

httpx stays the API providers and tests speak (respx mocks it), but its own connection pool
(httpcore) scans every connection on each request, so it costs more per request the more
are in flight; ``httpx-aiohttp`` puts aiohttp's connector under the same client, which
costs a third as much per request (bench/README.md, "Cost per job"). One client, so one
connector, per provider: its keep-alive connections go to that provider's host.

Three things differ from ``httpx_aiohttp.AiohttpTransport`` as it comes:

- failures become the httpx errors they are (its table makes a refused or dropped
  connection a ``ConnectTimeout``): ``ConnectError`` when no connection was made,
  ``RemoteProtocolError`` when the server closed it before answering, timeouts as timeouts;
- no cookie jar: httpx keeps the cookies, a second jar would send them twice;
- less work per request (a profile of bench scenario 12 found it): the headers go to aiohttp
  as the pairs they are (aiohttp reading httpx's ``Headers`` decodes every value on each
  lookup), the URL as already encoded (aiohttp would parse and quote it again), and the
  ``ClientTimeout`` is made once per timeout setting rather than per request.

A POST is never retried by the transport: aiohttp resends on a stale keep-alive connection
only for idempotent methods, so a request the gateway may have received surfaces as a
transient error for the dispatcher's backoff, which ``post`` reports as such.
"""

from __future__ import annotations

import aiohttp
import httpx
import yarl
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions

#: Response extensions, as ``AiohttpTransport`` gives them (aiohttp speaks HTTP/1.1).
HTTP_11 = b"HTTP/1.1"


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
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _session(self) -> aiohttp.ClientSession:
        """Made at the first request, inside the event loop that uses it."""
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        """httpx's timeouts of ``request`` as aiohttp's, as ``AiohttpTransport`` maps them."""
        given = request.extensions.get("timeout", {})
        key = (given.get("connect"), given.get("read"), given.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(sock_connect=key[0], sock_read=key[1], connect=key[2])
            self._timeouts[key] = timeout
        return timeout

    async def _forward(self, request: httpx.Request) -> httpx.Response:
        """The request through aiohttp, its failures as ``AiohttpTransport`` maps them."""
        try:
            content = request.content
        except httpx.RequestNotRead:  # a streamed body: the library's own way
            return await super().handle_async_request(request)
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        with map_aiohttp_exceptions():
            answer = await self.client.request(
                request.method,
                yarl.URL(str(request.url), encoded=True),
                headers=request.headers.multi_items(),
                data=content or None,
                allow_redirects=False,
                auto_decompress=False,
                compress=False,
                timeout=self._timeout(request),
            )
        extensions = {"http_version": HTTP_11}
        if answer.reason:
            extensions["reason_phrase"] = answer.reason.encode()
        return httpx.Response(
            status_code=answer.status,
            headers=answer.raw_headers,
            stream=AiohttpResponseStream(answer),
            request=request,
            extensions=extensions,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._forward(request)
        except httpx.TransportError as exc:
            better = _lost(exc.__cause__, request)
            if better is None:
                raise
            raise better from exc.__cause__
        except TimeoutError as exc:  # aiohttp's own, where the library did not map it
            raise _timed_out(exc, request) from exc


class _NoCookies(httpx.Cookies):
    """A jar that never takes a cookie, so no answer is parsed for one."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class GatewayClient(httpx.AsyncClient):
    """The ``httpx.AsyncClient`` of one provider, without cookies.

    Gateway APIs authenticate every request and keep no session, and httpx reads each answer
    for ``Set-Cookie`` through urllib's cookie machinery (3% of the CPU of an SMS in bench
    scenario 12), so this client keeps none; it refuses to be given any.
    """

    _none = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._none

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        raise TypeError("an SMS gateway client keeps no cookies")
