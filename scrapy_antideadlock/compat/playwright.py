"""scrapy-playwright (and Playwright) internals the safe handler relies on.

``SafePlaywrightDownloadHandler`` subclasses scrapy-playwright's handler and overrides a few
of its private methods; it also calls some of scrapy-playwright's private helpers. Every such
name is reached through this module, and :func:`check` verifies, at handler start, the
installed scrapy-playwright version against the supported range and that every name is still
there, so a release that moved one fails at start with a message naming it.

Helpers are looked up on their module at call time, so a test (or user) patching
``scrapy_playwright.handler._make_request_logger`` affects us the way it affects the stock
handler.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import CompatError, require

__all__ = ["SUPPORTED", "CompatError", "check", "context_wrapper", "default_context_name",
           "encode_body", "installed_version", "maybe_await", "missing_names", "page_content",
           "persistent_context_key", "request_logger", "response_logger", "set_redirect_meta",
           "target_closed_error"]

# scrapy-playwright versions this pack was verified with (also the ``playwright`` extra)
SUPPORTED = ((0, 0, 48), (0, 0, 49))  # [low, high)

# private methods of ScrapyPlaywrightDownloadHandler that the subclass overrides or calls,
# with the parameters it relies on
HANDLER_METHODS: dict[str, tuple[str, ...]] = {
    "_launch": (),
    "_maybe_launch_browser": (),
    "_create_browser_context": ("name", "context_kwargs", "spider"),
    "_create_page": ("request", "spider"),
    "_download_request": ("request", "spider"),
    "_download_request_with_retry": ("request", "spider"),
    "_download_request_with_page": ("request", "page", "spider"),
    "_get_response_and_download": ("request", "page", "spider"),
    "_apply_page_methods": ("page", "request", "spider"),
    "_browser_disconnected_callback": (),
    "_make_close_browser_context_callback": ("name", "persistent", "remote", "spider"),
    "_make_close_page_callback": ("context_name",),
    "_make_request_handler": ("context_name", "method", "url", "headers", "body", "encoding",
                              "spider", "initial_request_done"),
    "_increment_request_stats": ("request",),
    "_increment_response_stats": ("response",),
    "_get_total_page_count": (),
    "_set_stats_max_concurrent_page_count": ("count",),
    "_set_stats_max_concurrent_context_count": (),
    "_close": (),
}
UTILS = ("_encode_body", "_get_page_content", "_maybe_await", "_set_redirect_meta")
HANDLER_NAMES = ("BrowserContextWrapper", "Config", "DEFAULT_CONTEXT_NAME",
                 "PERSISTENT_CONTEXT_PATH_KEY", "_make_request_logger", "_make_response_logger")


def _handler_module() -> Any:
    return importlib.import_module("scrapy_playwright.handler")


def _utils() -> Any:
    return importlib.import_module("scrapy_playwright._utils")


def installed_version() -> tuple[int, ...] | None:
    try:
        raw = version("scrapy-playwright")
    except PackageNotFoundError:
        return None
    return tuple(int(p) for p in raw.split(".")[:3] if p.isdigit())


def _fmt(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def missing_names() -> list[str]:
    """Every private name (and parameter) used here that the installed release lacks."""
    missing: list[str] = []
    handler_mod = _handler_module()
    cls = getattr(handler_mod, "ScrapyPlaywrightDownloadHandler", None)
    for name, params in HANDLER_METHODS.items():
        method = getattr(cls, name, None)
        if not callable(method):
            missing.append(f"ScrapyPlaywrightDownloadHandler.{name}")
            continue
        have = inspect.signature(method).parameters
        missing += [f"ScrapyPlaywrightDownloadHandler.{name}({p}=)" for p in params
                    if p not in have]
    utils = _utils()
    missing += [f"scrapy_playwright._utils.{n}" for n in UTILS if not hasattr(utils, n)]
    missing += [f"scrapy_playwright.handler.{n}" for n in HANDLER_NAMES
                if not hasattr(handler_mod, n)]
    fields = getattr(getattr(handler_mod, "BrowserContextWrapper", None),
                     "__dataclass_fields__", {})
    missing += [f"BrowserContextWrapper.{f}" for f in ("context", "semaphore", "persistent")
                if f not in fields]
    try:
        target_closed_error()
    except (ImportError, AttributeError):
        missing.append("playwright._impl._errors.TargetClosedError")
    return missing


def check() -> None:
    """Fail with :class:`CompatError` if the installed scrapy-playwright is outside the
    supported range or lacks a private name the safe handler relies on."""
    found = installed_version()
    low, high = SUPPORTED
    problems = []
    if found is None or not low <= found < high:
        problems.append(f"scrapy-playwright {_fmt(found) if found else '(not installed)'} is "
                        f"outside the supported range >={_fmt(low)},<{_fmt(high)}")
    missing = missing_names()
    if missing:
        problems.append("these scrapy-playwright internals moved: " + ", ".join(missing))
    if problems:
        raise CompatError("SafePlaywrightDownloadHandler: " + "; ".join(problems)
                          + ". Install a supported scrapy-playwright (pip install "
                            "'scrapy-antideadlock[playwright]') or upgrade scrapy-antideadlock.")


require("scrapy_playwright private handler methods and helpers",
        "SafePlaywrightDownloadHandler (the drop-in Playwright handler)",
        lambda: not missing_names(), optional_module="scrapy_playwright")


# --------------------------------------------------------------------------- the names


def target_closed_error() -> type[Exception]:
    """Playwright's TargetClosedError (only exported from a private module)."""
    from playwright._impl._errors import TargetClosedError

    return TargetClosedError


def context_wrapper(context: Any, semaphore: Any, persistent: bool) -> Any:
    return _handler_module().BrowserContextWrapper(context=context, semaphore=semaphore,
                                                   persistent=persistent)


def default_context_name() -> str:
    return _handler_module().DEFAULT_CONTEXT_NAME


def persistent_context_key() -> str:
    return _handler_module().PERSISTENT_CONTEXT_PATH_KEY


def request_logger(context_name: str, spider: Any) -> Any:
    return _handler_module()._make_request_logger(context_name, spider)


def response_logger(context_name: str, spider: Any) -> Any:
    return _handler_module()._make_response_logger(context_name, spider)



def encode_body(headers: Any, text: str) -> tuple[bytes, str]:
    return _utils()._encode_body(headers=headers, text=text)


async def page_content(page: Any, spider: Any, context_name: str, url: str, method: str) -> str:
    return await _utils()._get_page_content(page=page, spider=spider, context_name=context_name,
                                            scrapy_request_url=url,
                                            scrapy_request_method=method)


async def maybe_await(obj: Any) -> Any:
    return await _utils()._maybe_await(obj)



async def set_redirect_meta(request: Any, response: Any) -> None:
    await _utils()._set_redirect_meta(request=request, response=response)

