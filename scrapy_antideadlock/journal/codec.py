"""How the journal writes a request and reads it back (``Request.to_dict`` in JSON).

Per-process meta (absolute deadlines, live objects, owner ids) is dropped; secret headers
are never written; values JSON cannot hold are pickled and base64-encoded.
"""

from __future__ import annotations

import base64
import json
import operator
import pickle
from typing import Any

from scrapy import Request

from .. import metakeys

__all__ = ["decode_payload", "encode_payload", "pickle_unjsonable", "snapshot", "to_dict"]

# Meta that means nothing in another process: absolute monotonic deadlines, live objects,
# owner ids (made of the pid, which a restarted container reuses).
_DROP_META = frozenset((*metakeys.PROCESS_LOCAL, "download_latency", "download_slot",
                        "playwright_page"))
_SECRET_HEADERS = (b"Proxy-Authorization", b"Authorization")
_PICKLED = "$pickle"
#: Attributes ``to_dict`` returns as the request's own (mutable) objects, besides meta.
_SHARED = ("cb_kwargs", "flags", "cookies")
#: ``Request``'s constructor defaults (as encoded). A plain Request's payload leaves them
#: out (``request_from_dict`` passes on only the keys present): less to keep until the
#: journal's flush and to JSON-encode there.
_DEFAULTS: dict[str, Any] = {
    "errback": None, "headers": {}, "body": "", "cookies": {}, "meta": {}, "encoding": "utf-8",
    "flags": [], "cb_kwargs": {}, "dont_filter": False, "method": "GET", "priority": 0}
_KEEP = object()
_UNKNOWN = object()


def snapshot(request: Request, spider: Any, names: dict[Any, Any]) -> dict[str, Any]:
    """``encode_payload(to_dict(request, spider, names))``: the same payload, built in
    one pass for a plain ``Request`` whose callbacks are known spider methods (nearly
    every request of a crawl; the journal takes one per request scheduled)."""
    if type(request) is not Request:
        return encode_payload(to_dict(request, spider, names))
    callback = _known_name(request.callback, spider, names)
    errback = _known_name(request.errback, spider, names)
    if callback is _UNKNOWN or errback is _UNKNOWN:
        return encode_payload(to_dict(request, spider, names))
    data: dict[str, Any] = {"url": request.url, "callback": callback}
    if errback is not None:
        data["errback"] = errback
    headers = request.headers
    if headers:
        encoded = _headers(dict(headers))
        if encoded:
            data["headers"] = encoded
    body = request.body
    if body:
        data["body"] = _pickled(body)
    cookies = request.cookies
    if cookies != {}:
        data["cookies"] = cookies.copy() if cookies and isinstance(cookies, dict | list) \
            else cookies
    meta = request.meta
    if meta:
        meta = {key: value for key, value in meta.items() if key not in _DROP_META}
        if meta:
            data["meta"] = meta
    if request.encoding != "utf-8":
        data["encoding"] = request.encoding
    flags = request.flags
    if flags != []:
        data["flags"] = flags.copy() if flags and isinstance(flags, list) else flags
    cb_kwargs = request.cb_kwargs
    if cb_kwargs:
        data["cb_kwargs"] = cb_kwargs.copy() if isinstance(cb_kwargs, dict) else cb_kwargs
    if request.dont_filter:
        data["dont_filter"] = request.dont_filter
    if request.method != "GET":
        data["method"] = request.method
    if request.priority:
        data["priority"] = request.priority
    return data


def _known_name(func: Any, spider: Any, names: dict[Any, Any]) -> Any:
    """The journaled name of a callback: as is if not callable, the remembered name of a
    spider method, else _UNKNOWN (``to_dict`` finds it, or raises)."""
    if not callable(func):
        return func
    if getattr(func, "__self__", None) is not spider:
        return _UNKNOWN
    return names.get(getattr(func, "__func__", None), _UNKNOWN)


def to_dict(request: Request, spider: Any, names: dict[Any, Any]) -> dict[str, Any]:
    """``request.to_dict(spider=spider)``, with the callback-name lookup cached (and,
    per request class, one getter for the other attributes) in ``names``.

    Scrapy finds a callback's name with ``inspect.getmembers(spider)`` on every call
    (most of the journal's cost per request); a spider's methods do not change, so the
    name found for a function is remembered. Anything unusual takes Scrapy's path.
    """
    found: list[Any] = []
    for func in (request.callback, request.errback):
        if not callable(func):
            found.append(func)
            continue
        key = getattr(func, "__func__", None)
        name = names.get(key) if getattr(func, "__self__", None) is spider else None
        if name is None:
            data = request.to_dict(spider=spider)  # raises for non-spider callbacks
            for fn, field in ((request.callback, "callback"), (request.errback, "errback")):
                if callable(fn) and getattr(fn, "__self__", None) is spider:
                    names[fn.__func__] = data[field]
            return data
        found.append(name)
    data = {"url": request.url, "callback": found[0], "errback": found[1],
            "headers": dict(request.headers)}
    cls = type(request)
    rest = names.get(cls)  # the other attributes and one getter for them, per class
    if rest is None:
        attrs = tuple(a for a in request.attributes if a not in data)
        rest = names[cls] = (attrs, operator.attrgetter(*attrs) if attrs else None)
    attrs, getter = rest
    if len(attrs) == 1:
        data[attrs[0]] = getter(request)
    elif attrs:
        data.update(zip(attrs, getter(request), strict=True))
    if cls is not Request:
        data["_class"] = request.__module__ + "." + request.__class__.__name__
    return data


def encode_payload(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (from :func:`to_dict`) made ready for the journal, and a snapshot of the
    request: the journal JSON-encodes it later, at its flush, while downloader
    middlewares go on changing the live request. So the containers ``to_dict`` shares
    with the request are copied (one level: values inside them are not)."""
    meta = data["meta"] = dict(data.get("meta") or {})  # to_dict shares the live meta
    for name in _SHARED:
        value = data.get(name)
        if value:
            data[name] = value.copy() if isinstance(value, dict | list) else value
    for name in _DROP_META & meta.keys():
        del meta[name]
    headers = data.get("headers")
    if headers:
        data["headers"] = _headers(headers)
    body = data.get("body")
    if isinstance(body, bytes):
        data["body"] = _pickled(body) if body else ""
    if "_class" in data:  # a subclass's constructor may treat a missing argument its own way
        return data
    return {name: value for name, value in data.items() if value != _DEFAULTS.get(name, _KEEP)}


def pickle_unjsonable(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the meta and cb_kwargs values JSON cannot hold pickled; raises if it
    still cannot be written. Only for the rare request the journal failed to write as is
    (JSON-encoding each value up front would double the cost of every request)."""
    for name in ("meta", "cb_kwargs"):
        mapping = data.get(name)
        if mapping:
            data[name] = {k: _jsonable(v) for k, v in mapping.items()}
    json.dumps(data)
    return data


def decode_payload(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    for name in ("meta", "cb_kwargs"):
        if data.get(name):
            data[name] = {k: _restore(v) for k, v in data[name].items()}
    data["body"] = _restore(data.get("body") or b"")
    if isinstance(data["body"], str):
        data["body"] = data["body"].encode()
    return data


def _headers(headers: dict[Any, Any]) -> dict[str, list[str]]:
    """Headers as text, without the secret ones."""
    return {_text(k): [_text(v) for v in values] for k, values in headers.items()
            if (k if isinstance(k, bytes) else str(k).encode()).title() not in _SECRET_HEADERS}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return _pickled(value)


def _pickled(value: Any) -> dict[str, str]:
    """``value`` as JSON can hold it (read back by ``_restore``)."""
    return {_PICKLED: base64.b64encode(pickle.dumps(value)).decode()}


def _restore(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {_PICKLED}:
        return pickle.loads(base64.b64decode(value[_PICKLED]))
    return value


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)

