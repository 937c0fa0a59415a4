"""The Python client of the wire protocol (PROTOCOL.md), blocking and asyncio.

``_core`` does everything that needs no I/O: building and checking request lines, reading
answers into results or exceptions, the pipelining window of ``send_many`` and the retry
policy. ``_async.AsyncClient`` inherits it and adds the I/O, through the asyncio half of the
pairs in ``_transports``. ``_sync.Client`` is generated from ``_async.py`` by
``scripts/unasync.py`` and uses the blocking-socket half, so both speak the protocol in the
same way, and cannot drift apart.

The public names are exported from ``notifier``; import them from there.
"""
