"""The crawler context's shared signal receiver: one Scrapy receiver, every handler called."""

from __future__ import annotations

import logging

from scrapy import Request, signals
from scrapy.exceptions import IgnoreRequest
from scrapy.utils.test import get_crawler
from twisted.python.failure import Failure

from scrapy_antideadlock.context import connect_shared, disconnect_shared


def test_shared_receiver_calls_every_handler_and_keeps_ignore_request(caplog):
    """A failing handler is logged and the next still runs; IgnoreRequest (the journal's
    "seen in a previous run") reaches the engine as it would from its own receiver."""
    crawler = get_crawler()
    calls = []

    def broken(request, **kwargs):
        calls.append("broken")
        raise ValueError("boom")

    def ignoring(request, **kwargs):
        calls.append("ignoring")
        raise IgnoreRequest("seen")

    def counting(request, spider=None, **kwargs):
        calls.append(("counting", request.url, spider))

    for handler in (broken, ignoring, counting):
        connect_shared(crawler, handler, signals.request_scheduled)
    request = Request("http://127.0.0.1/a")
    with caplog.at_level(logging.ERROR):
        results = crawler.signals.send_catch_log(signals.request_scheduled, request=request,
                                                 spider="s", dont_log=IgnoreRequest)
    assert calls == ["broken", "ignoring", ("counting", request.url, "s")]
    assert len(results) == 1  # one receiver for the three handlers
    failure = results[0][1]
    assert isinstance(failure, Failure) and isinstance(failure.value, IgnoreRequest)
    assert "boom" in caplog.text

    for handler in (broken, ignoring):
        disconnect_shared(crawler, handler, signals.request_scheduled)
    calls.clear()
    assert crawler.signals.send_catch_log(signals.request_scheduled, request=request) \
        == [(results[0][0], None)]
    assert calls == [("counting", request.url, None)]
    disconnect_shared(crawler, counting, signals.request_scheduled)
    assert crawler.signals.send_catch_log(signals.request_scheduled, request=request) == []
