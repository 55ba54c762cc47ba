"""Request bodies read within a bound, and error answers in the API's one shape."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.call.actions import ActionRefused
from gateway.control.parse import error, error_body


async def read_bounded(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (not after reading it all)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise error(413, "body_too_large", f"the body is over {limit // 1024} KiB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise error(413, "body_too_large", f"the body is over {limit // 1024} KiB")
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise error(400, "malformed_json", "the body is not valid JSON") from None


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def error_response(exc: ActionRefused) -> Response:
    return json_response(error_body(exc), exc.status)
