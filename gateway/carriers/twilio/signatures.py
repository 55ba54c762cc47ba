"""X-Twilio-Signature checks, with Twilio's own RequestValidator."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from twilio.request_validator import RequestValidator

from gateway.carriers.twilio.codec import MEDIA_PATH


class SignatureChecker:
    """Checks X-Twilio-Signature against URLs built from PUBLIC_URL, never from request headers.

    `on_reject(path)` is told of every refusal (the metrics count them by path: the media
    socket's as MEDIA_PATH, without the call SID that follows it)."""

    def __init__(
        self, auth_token: str, enabled: bool = True, on_reject: Callable[[str], None] | None = None
    ) -> None:
        self.enabled = enabled
        self._validator = RequestValidator(auth_token) if auth_token else None
        self._on_reject = on_reject

    def valid(self, url: str, params: Mapping[str, str], signature: str | None) -> bool:
        if not self.enabled:
            return True
        ok = bool(self._validator and signature and self._validator.validate(url, dict(params), signature))
        if not ok and self._on_reject is not None:
            path = urlsplit(url).path
            head, media, _sid = path.partition(MEDIA_PATH + "/")
            self._on_reject(head + MEDIA_PATH if media else path)
        return ok
