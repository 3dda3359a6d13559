"""What Python sees of the compiled response heads (src/pyworker/response_head.pyx)."""

from typing import Any

def build_head(cycle: Any, body: bytes, more_body: bool) -> bytes:
    """The status line and headers of `cycle`'s response (a pyworker.asgi.RequestCycle).

    Records the framing it decides on the cycle (content_length, chunked,
    keep_alive); RuntimeError for a status or a header the app may not send.
    """
