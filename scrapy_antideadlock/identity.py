"""Stable owner ids: a lease's owner is the request (docs/internals.md, "Owner identity").

The id lives in ``request.meta`` so it survives retries and redirects (Scrapy copies
meta into the new request), which lets the wait-for graph join what one request
holds in the proxy pool with what its items wait for in the pipeline.
"""

from __future__ import annotations

import itertools
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import metakeys

META_KEY = metakeys.REQUEST_ID
_counter = itertools.count(1)
_prefix = f"r{os.getpid():x}-"


def request_id(request: Any) -> str:
    """The owner id of ``request``, assigned on first use and kept in its meta."""
    meta = request.meta
    rid = meta.get(META_KEY)
    if rid is None:
        rid = meta[META_KEY] = f"{_prefix}{next(_counter)}"
    return rid


def describe(request: Any) -> str:
    """A short human label for diagnostics: ``<id> GET url`` (credentials stripped)."""
    return f"{request_id(request)} {request.method} {strip_credentials(request.url)}"


def strip_credentials(url: str) -> str:
    """``http://user:pw@host/x`` -> ``http://host/x``; for logs, stats and diagnostics."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
