"""Running the app under uvicorn with connection limits: what `ferkit serve` calls.

uvicorn bounds idle kept-alive connections (`timeout_keep_alive`), the header size (h11's 16 KB incomplete-event
limit) and connections + running requests (`limit_concurrency`, 503 past it), but it waits forever for the
headers of a request: a client that sends one header byte every few seconds holds its connection (and a place
under `limit_concurrency`) as long as it likes. `header_timeout_protocol` adds that one missing timer to
uvicorn's h11 protocol. Body timeouts, request slots and the decode-memory budget live in the app (`app.py`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ferkit.serving.app import ServeSettings

log = logging.getLogger("ferkit.serving")


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers take more than `header_timeout` s.

    The timer starts when the connection opens, or at the first byte of the next request on a kept-alive
    connection (before that byte, uvicorn's keep-alive timeout applies), and stops once h11 has the whole
    request head.
    """

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still no complete request head
            if self._header_timer is None and not self.transport.is_closing():
                self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info("%s: no complete request headers within %g s; closing the connection", client,
                     self.header_timeout)
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """`HeaderTimeoutH11Protocol` with its timeout set (uvicorn instantiates the class it is given)."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": float(seconds)})


def release_large_frees(threshold: int = 4 * 1024 * 1024) -> bool:
    """Make glibc hand blocks of `threshold` bytes and more back to the OS when freed (True if it took).

    glibc raises its mmap threshold after the first large free (up to 32 MB), so Pillow's 16 MB image blocks and
    NumPy's image arrays then come from per-thread heaps that keep the memory once freed: measured, sixteen
    clients posting 25-megapixel PNGs one decode at a time took the server from 390 MB to 1.3 GB, against 0.7 GB
    for one client. Setting the threshold fixes it (and stops the adjusting): 0.7 GB for sixteen clients too.
    A no-op where the C library has no mallopt (musl, macOS).
    """
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_mmap_threshold, int(threshold)))


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """The keyword arguments of `uvicorn.run` / `uvicorn.Config` that apply `settings`' connection limits."""
    return {"http": header_timeout_protocol(settings.header_timeout),
            "limit_concurrency": settings.max_connections,
            "timeout_keep_alive": settings.keep_alive_timeout}


__all__ = ["HeaderTimeoutH11Protocol", "header_timeout_protocol", "release_large_frees", "uvicorn_options"]
