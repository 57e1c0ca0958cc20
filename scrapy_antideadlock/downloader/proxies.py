"""Proxy endpoints: credentials split off the URL once, so only the bare URL is ever shown."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from ..identity import strip_credentials


@dataclass(frozen=True)
class ProxyEndpoint:
    """One proxy: ``name`` (member name, no credentials), ``url`` for meta, auth header."""

    name: str
    url: str
    auth: bytes | None = None  # value of Proxy-Authorization, never logged

    def __repr__(self) -> str:  # never show the header
        return f"ProxyEndpoint({self.name!r})"


def parse_proxies(capacities: dict[str, int | None], default: int
                  ) -> tuple[dict[str, ProxyEndpoint], dict[str, int]]:
    """Endpoints by member name and capacities by member name from PROXY_LIST."""
    endpoints: dict[str, ProxyEndpoint] = {}
    caps: dict[str, int] = {}
    for raw, capacity in capacities.items():
        parts = urlsplit(raw)
        auth = None
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
            auth = b"Basic " + base64.b64encode(f"{user}:{password}".encode("latin-1"))
        url = strip_credentials(raw)
        url = urlunsplit((parts.scheme, urlsplit(url).netloc, "", "", ""))
        name, n = url, 1
        while name in endpoints:  # same host with other credentials
            n += 1
            name = f"{url}#{n}"
        endpoints[name] = ProxyEndpoint(name, url, auth)
        caps[name] = capacity or default
    return endpoints, caps
