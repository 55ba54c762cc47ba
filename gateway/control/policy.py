"""Where TRANSFER_TO and TRANSFER_ALLOW let an agent send a call."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from gateway.destinations import SIP_URI, normalise_destination


@dataclass(frozen=True, slots=True)
class TransferPolicy:
    """Where an agent may send a call: TRANSFER_TO, TRANSFER_ALLOW, TRANSFER_CALLER_ID."""

    default_to: str = ""
    allow: tuple[str, ...] = ()
    caller_id: str = ""

    def allows(self, target: str) -> bool:
        if self.default_to and target == normalise_destination(self.default_to):
            return True
        # SIP targets are matched as scheme:user@host, parameters and port left out.
        match = SIP_URI.fullmatch(target)
        if target.lower().startswith("sip") and (match is None or ";maddr=" in target.lower()):
            return False  # maddr would send the INVITE to another host than the one matched
        if match is not None:
            user = f"{match['user']}@" if match["user"] else ""
            target = f"{match['scheme'].lower()}:{user}{match['host'].lower()}"
        return any(fnmatch.fnmatchcase(target, pattern) for pattern in self.allow)
