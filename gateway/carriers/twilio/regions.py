"""Twilio's regions and edges: which REST host a TWILIO_REGION / TWILIO_EDGE pair reaches (pure).

Twilio's regional hosts are `{product}.{edge}.{region}.twilio.com` (api.dublin.ie1.twilio.com).
Since 28 April 2026 the region-only form (`api.ie1.twilio.com`) no longer answers, so a region
given without an edge takes its default edge from the table Twilio's own libraries use
(twilio-java, -go, -csharp: au1 sydney, ie1 dublin, jp1 tokyo, ...). An edge without a region
keeps twilio-python's rule: region us1.
"""

from __future__ import annotations

import re

# Region -> the edge location Twilio's libraries pair it with by default.
DEFAULT_EDGES = {
    "au1": "sydney",
    "br1": "sao-paulo",
    "de1": "frankfurt",
    "ie1": "dublin",
    "jp1": "tokyo",
    "jp2": "osaka",
    "sg1": "singapore",
    "us1": "ashburn",
    "us2": "umatilla",
}
_REGION = re.compile(r"^[a-z]{2}[0-9]$")
_EDGE = re.compile(r"^[a-z][a-z0-9-]*$")


class RegionError(ValueError):
    """TWILIO_REGION or TWILIO_EDGE cannot name a Twilio host."""


def resolve(region: str, edge: str) -> tuple[str, str]:
    """(region, edge) as the REST client should use them; ("", "") for the global host."""
    region, edge = region.strip().lower(), edge.strip().lower()
    if region and not _REGION.match(region):
        raise RegionError(f"TWILIO_REGION must look like ie1, au1 or jp1, got {region!r}")
    if edge and not _EDGE.match(edge):
        raise RegionError(f"TWILIO_EDGE must be an edge location such as dublin or sydney, got {edge!r}")
    if region and not edge:
        if region not in DEFAULT_EDGES:
            known = ", ".join(sorted(DEFAULT_EDGES))
            raise RegionError(
                f"TWILIO_REGION={region} has no default edge (known: {known}): set TWILIO_EDGE too"
            )
        edge = DEFAULT_EDGES[region]
    if edge and not region:
        region = "us1"  # twilio-python's own default when only an edge is given
    return region, edge


def api_host(region: str, edge: str, product: str = "api") -> str:
    """The host a request for `product` goes to, e.g. api.dublin.ie1.twilio.com."""
    region, edge = resolve(region, edge)
    return ".".join(part for part in (product, edge, region, "twilio", "com") if part)
