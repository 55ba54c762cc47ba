"""Request bodies read within a bound, and error answers in the API's one shape."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.call.actions import ActionRefused
from gateway.control.parse import error, error_body

# The whole body must arrive within this long of the handler asking for it. Every body the
# gateway takes is at most 1 MiB (a batch), seconds on any real link; a client trickling one
# byte at a time would otherwise hold a connection and a handler for as long as it likes.
BODY_READ_TIMEOUT_S = 10.0


async def read_bounded(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (not after reading it all),
    and with 408 when it has not all come within BODY_READ_TIMEOUT_S."""
    length = request.headers.get("content-length", "")
    # ASCII digits only ("²".isdigit() is true), and not so many that int() refuses them.
    if length.isascii() and length.isdigit() and (len(length) > 12 or int(length) > limit):
        raise error(413, "body_too_large", f"the body is over {limit // 1024} KiB")
    chunks, size = [], 0
    timeout = BODY_READ_TIMEOUT_S  # read when called, so a test can shorten it
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise error(413, "body_too_large", f"the body is over {limit // 1024} KiB")
                chunks.append(chunk)
    except TimeoutError:
        raise error(408, "body_timeout", f"the body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)


def json_body(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise error(400, "malformed_json", "the body is not valid JSON") from None


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def error_response(exc: ActionRefused) -> Response:
    response = json_response(error_body(exc), exc.status)
    if exc.status == 408:
        # The client may still be trickling the rest: close the connection rather than hold
        # it open for it (uvicorn closes once a response says so).
        response.headers["connection"] = "close"
    return response
