"""X-Twilio-Signature checks, with Twilio's own RequestValidator."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.request_validator import RequestValidator


class SignatureChecker:
    """Checks X-Twilio-Signature against URLs built from PUBLIC_URL, never from request headers."""

    def __init__(self, auth_token: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self._validator = RequestValidator(auth_token) if auth_token else None

    def valid(self, url: str, params: Mapping[str, str], signature: str | None) -> bool:
        if not self.enabled:
            return True
        if self._validator is None or not signature:
            return False
        return bool(self._validator.validate(url, dict(params), signature))
