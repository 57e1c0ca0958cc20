"""Which Twisted reactor the crawl runs on, and a clear refusal where asyncio is needed.

Most of the pack runs on asyncio (tasks, futures, ``asyncio.wait_for``, psycopg's
async pool, the loop monitor). Under another reactor Scrapy supports (epoll, select,
poll) those calls fail with ``no running event loop`` in the middle of the crawl.
So the add-on leaves such components out under another reactor, and each of them
refuses at start (``NotConfigured``) when configured by hand: the crawl then runs as
plain Scrapy would, never worse.
"""

from __future__ import annotations

from typing import Any

from scrapy.exceptions import NotConfigured

__all__ = ["ASYNCIO_REACTOR", "asyncio_reactor_configured", "reactor_name",
           "require_asyncio_reactor", "requirement_text"]

ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"


def reactor_name(settings: Any | None = None) -> str:
    """The reactor the crawl runs (or will run) on, as an import path."""
    path = settings.get("TWISTED_REACTOR") if settings is not None else None
    if path:
        return str(path)
    from scrapy.utils.reactor import is_reactor_installed

    if is_reactor_installed():
        from twisted.internet import reactor

        return f"{type(reactor).__module__}.{type(reactor).__qualname__}"
    return "twisted.internet.default (TWISTED_REACTOR = None)"


def asyncio_reactor_configured(settings: Any | None = None) -> bool:
    """Whether the crawl runs on Twisted's asyncio reactor.

    With TWISTED_REACTOR set, Scrapy installs it or refuses to start, so the setting
    decides; without it, the installed reactor does.
    """
    path = settings.get("TWISTED_REACTOR") if settings is not None else None
    if path:
        return str(path) == ASYNCIO_REACTOR
    from scrapy.utils.reactor import is_asyncio_reactor_installed, is_reactor_installed

    return is_reactor_installed() and is_asyncio_reactor_installed()


def requirement_text(what: str, settings: Any | None = None) -> str:
    """One line saying what needs the asyncio reactor and how to switch to it."""
    return (f"{what} need(s) the asyncio reactor and this crawl runs on "
            f"{reactor_name(settings)}; set TWISTED_REACTOR = \"{ASYNCIO_REACTOR}\"")


def require_asyncio_reactor(what: str, settings: Any | None = None) -> None:
    """Raise ``NotConfigured`` (one clear line) unless the crawl runs on asyncio."""
    if not asyncio_reactor_configured(settings):
        raise NotConfigured(requirement_text(what, settings))
