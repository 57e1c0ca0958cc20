"""The journal's payload of a request: the one-pass ``snapshot`` builds exactly what the
general path (``to_dict`` then ``encode_payload``) builds, and it reads back as the
request that was scheduled."""

from __future__ import annotations

import pytest
from scrapy import Request, Spider
from scrapy.http import FormRequest
from scrapy.utils.request import request_from_dict

from scrapy_antideadlock import metakeys
from scrapy_antideadlock.journal.codec import decode_payload, encode_payload, snapshot, to_dict


class CodecSpider(Spider):
    name = "codec"

    def parse(self, response):
        pass

    def parse_item(self, response):
        pass

    def failed(self, failure):
        pass


SPIDER = CodecSpider()


def _requests():
    s = SPIDER
    return {
        "plain": Request("http://a.test/1", callback=s.parse_item),
        "no callback": Request("http://a.test/2"),
        "errback": Request("http://a.test/3", callback=s.parse, errback=s.failed),
        "meta": Request("http://a.test/4", callback=s.parse, meta={
            "depth": 2, "x": [1, 2], metakeys.REQUEST_ID: "r1", metakeys.DEADLINE: 1.5,
            metakeys.JOURNAL_OWNER: 7, "download_slot": "a.test", metakeys.JOURNAL_KEY: "k"}),
        "only process-local meta": Request("http://a.test/5", meta={
            metakeys.REQUEST_ID: "r1", "download_latency": 0.1}),
        "headers": Request("http://a.test/6", headers={
            "X-A": "1", "Accept": ["a", "b"], "Authorization": "Basic c2VjcmV0",
            "proxy-authorization": "Basic c2VjcmV0"}),
        "only secret headers": Request("http://a.test/7", headers={"Authorization": "x"}),
        "post": Request("http://a.test/8", method="POST", body=b"a=1&b=\xff",
                        priority=-3, dont_filter=True, encoding="latin-1"),
        "cookies dict": Request("http://a.test/9", cookies={"s": "1"}),
        "cookies list": Request("http://a.test/10", cookies=[{"name": "s", "value": "1"}]),
        "empty cookies list": Request("http://a.test/11", cookies=[]),
        "flags and kwargs": Request("http://a.test/12", callback=s.parse_item,
                                    flags=["f"], cb_kwargs={"page": 3}),
        "subclass": FormRequest("http://a.test/13", formdata={"q": "x"},
                                callback=s.parse_item),
    }


@pytest.mark.parametrize("name", list(_requests()))
def test_snapshot_is_the_general_paths_payload(name):
    request = _requests()[name]
    names: dict = {}
    expected = encode_payload(to_dict(request, SPIDER, names))
    for _ in range(2):  # callback names unknown, then remembered
        assert snapshot(request, SPIDER, names) == expected


@pytest.mark.parametrize("name", list(_requests()))
def test_snapshot_reads_back_as_the_scheduled_request(name):
    request = _requests()[name]
    names: dict = {}
    snapshot(request, SPIDER, names)
    back = request_from_dict(decode_payload(snapshot(request, SPIDER, names)), spider=SPIDER)
    assert type(back) is type(request)
    for attr in ("url", "method", "body", "encoding", "priority", "dont_filter", "flags",
                 "cb_kwargs", "callback", "errback"):
        assert getattr(back, attr) == getattr(request, attr), attr
    assert back.meta == {k: v for k, v in request.meta.items()
                         if k not in (*metakeys.PROCESS_LOCAL, "download_slot",
                                      "download_latency")}
    assert b"Authorization" not in back.headers and b"Proxy-Authorization" not in back.headers
    for key in request.headers:
        if key.title() not in (b"Authorization", b"Proxy-Authorization"):
            assert back.headers.getlist(key) == request.headers.getlist(key)


def test_snapshot_is_a_copy_the_live_request_cannot_change():
    request = Request("http://a.test/1", meta={"a": 1}, cookies={"s": "1"}, flags=["f"],
                      cb_kwargs={"k": 1})
    names: dict = {}
    snapshot(request, SPIDER, names)
    payload = snapshot(request, SPIDER, names)
    request.meta["b"] = 2
    request.cookies["t"] = "2"
    request.flags.append("g")
    request.cb_kwargs["j"] = 2
    assert payload["meta"] == {"a": 1} and payload["cookies"] == {"s": "1"}
    assert payload["flags"] == ["f"] and payload["cb_kwargs"] == {"k": 1}


def test_a_callback_that_is_not_a_spider_method_takes_scrapys_path_and_raises():
    request = Request("http://a.test/1", callback=lambda response: None)
    with pytest.raises(ValueError):
        snapshot(request, SPIDER, {})
