"""The Python client of the wire protocol (PROTOCOL.md), blocking and asyncio.

``_core`` does everything that needs no I/O: building and checking request lines, reading
answers into results or exceptions, the pipelining window of ``send_many`` and the retry
policy. ``_sync.Client`` (blocking sockets) and ``_async.AsyncClient`` (asyncio streams)
inherit it and add only their I/O, so both speak the protocol in the same way.

The public names are exported from ``notifier``; import them from there.
"""
