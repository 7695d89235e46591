"""uvicorn with a deadline on request headers. uvicorn times out idle keep-alive
connections, but a connection that sends part of its headers (or none) is held forever;
many of them use up the server's file descriptors. Here a connection that has not
completed a request's headers within `seconds` of opening (or of its previous response)
is closed. The body has its own deadline in the app."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """An HTTP/1.1 protocol class for `uvicorn.Config(http=...)`."""

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            # Armed first: a pipelined request that starts inside the call is then already
            # a new cycle, so its own (long) answer is never cut.
            self._arm_header_deadline()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            # A new request replaces `cycle`; the same cycle at the deadline means no new
            # request's headers were completed in time.
            waiting_after = self.cycle
            self._header_timer = self.loop.call_later(seconds, self._headers_late, waiting_after)

        def _disarm_header_deadline(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _headers_late(self, waiting_after: Any) -> None:
            self._header_timer = None
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol


def uvicorn_config(app: Any, host: str, port: int, read_timeout: float, **kwargs: Any):
    """A `uvicorn.Config` whose connections must deliver request headers in time."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=header_deadline_protocol(read_timeout),
                          **kwargs)  # fmt: skip
