"""The fault site serves a real catalogue and its faults really happen."""

from __future__ import annotations

import socket
import statistics
import time
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_antideadlock.testing import (
    CrawlTimeout,
    Fault,
    FaultSite,
    Latency,
    SiteSpider,
    run_crawl,
    wait_until,
)


class RaisingSpider(SiteSpider):
    """Every third detail page makes the callback raise."""

    def parse_item(self, response, **kwargs):
        if int(response.url[-1]) % 3 == 0:
            raise ValueError("boom")
        yield from super().parse_item(response, **kwargs)


FAST = {"DOWNLOAD_DELAY": 0, "CONCURRENT_REQUESTS": 16, "LOG_LEVEL": "WARNING"}


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_pages_and_items(fault_site: FaultSite) -> None:
    status, body = _get(fault_site.start_url)
    assert status == 200
    first = fault_site.item_keys()[:10]
    for key in first:
        assert f'href="/item/{key}"'.encode() in body
    assert b'href="/list/1"' in body
    status, body = _get(fault_site.url(f"/item/{first[3]}"))
    item = fault_site.item(first[3])
    assert status == 200
    assert f'data-key="{first[3]}"'.encode() in body
    assert item["name"].encode() in body and item["price"].encode() in body
    assert _get(fault_site.url("/nope"))[0] == 404
    assert _get(fault_site.url(f"/list/{fault_site.pages}"))[0] == 404
    assert fault_site.hits["/nope"] == 1 and fault_site.hits["/never"] == 0
    assert len(fault_site.item_keys()) == 200 == len(set(fault_site.item_keys()))


def test_js_pages_have_empty_body_without_js(fault_site: FaultSite) -> None:
    _, body = _get(fault_site.url("/js/list/0"))
    assert b"item-link" not in body.split(b"<script>")[0]
    assert b"setTimeout" in body and b"/js/item/k00000" in body


def test_same_seed_same_site() -> None:
    with FaultSite(seed=7) as a, FaultSite(seed=7) as b, FaultSite(seed=8) as c:
        for s in (a, b, c):
            s.add_fault("/item/*", Fault.status(500), rate=0.2)
        assert a.expected_keys() == b.expected_keys() != c.expected_keys()
        assert a.item("k00001") == b.item("k00001") != c.item("k00001")
        assert 140 <= len(a.expected_keys()) <= 180


def test_keep_alive(fault_site: FaultSite) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", fault_site.port, timeout=5)
    for path in ("/list/0", "/item/k00000", "/item/k00001"):
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
    conn.request("HEAD", "/item/k00002")
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.headers["Content-Length"]) > 0 and resp.read() == b""
    conn.close()
    assert fault_site.total_requests == 4


@deferred_f_from_coro_f
async def test_crawl_gets_every_expected_item_deterministically(make_fault_site) -> None:
    results = []
    for _ in range(2):
        site = make_fault_site(pages=5, items_per_page=8, seed=3)
        site.add_fault("/item/*", Fault.status(404), rate=0.25)
        site.add_fault("/list/4", Fault.reset())
        result = await run_crawl(SiteSpider, FAST, timeout=30, start_url=site.start_url)
        assert result.finished and result.reason == "finished"
        assert sorted(result.keys()) == sorted(site.expected_keys())
        assert 20 <= len(result.items) < 32
        for item in result.items:
            assert item == {**site.item(item["key"]), "url": site.url(f"/item/{item['key']}")}
        results.append(sorted(result.keys()))
        assert result.stats["item_scraped_count"] == len(result.items)
    assert results[0] == results[1]


@deferred_f_from_coro_f
async def test_hang_really_hangs_a_plain_crawl(make_fault_site) -> None:
    site = make_fault_site(pages=2, items_per_page=4)
    site.add_fault("/item/k00003", Fault.hang())
    result = await run_crawl(SiteSpider, FAST, timeout=3, expect_hang=True,
                             start_url=site.start_url)
    assert not result.finished  # DOWNLOAD_TIMEOUT (180 s) is far away
    assert site.hanging >= 1
    assert "k00003" in result.diagnostics
    assert sorted(result.keys()) == site.expected_keys()  # all the others arrived
    site.stop()  # aborts the held connection: the abandoned crawl then ends on its own
    assert site.hanging == 0
    await wait_until(lambda: not result.crawler.engine.running, timeout=10,
                     message="abandoned crawl did not end after the site aborted its connection")


@pytest_twisted.ensureDeferred  # the harness also works in a Twisted-driven coroutine
async def test_hang_without_expect_hang_raises_crawl_timeout(fault_site: FaultSite) -> None:
    fault_site.add_fault("/list/0", Fault.hang())
    started = time.monotonic()
    with pytest.raises(CrawlTimeout, match="/list/0"):
        await run_crawl(SiteSpider, FAST, timeout=1.5, start_url=fault_site.start_url)
    assert time.monotonic() - started < 15  # fails fast, not after DOWNLOAD_TIMEOUT


def test_slow_headers_and_drip(fault_site: FaultSite) -> None:
    fault_site.add_fault("/item/k00000", Fault.slow_headers(0.6))
    fault_site.add_fault("/item/k00001", Fault.drip(0.6, chunks=4))
    for path in ("/item/k00000", "/item/k00001"):
        started = time.monotonic()
        status, body = _get(fault_site.url(path))
        assert status == 200 and b"data-key" in body
        assert time.monotonic() - started >= 0.55


def test_drip_sends_headers_first(fault_site: FaultSite) -> None:
    fault_site.add_fault("/item/k00001", Fault.drip(1.6, chunks=5))
    with socket.create_connection(("127.0.0.1", fault_site.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /item/k00001 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        first = sock.recv(4096)
        head_at = time.monotonic() - started
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
        total = time.monotonic() - started
    assert first.startswith(b"HTTP/1.1 200")
    assert b"</html>" not in first  # headers first, body later
    assert total - head_at >= 1.2  # the body really trickled after the headers
    assert b"</html>" in first + rest


def test_status_and_reset(fault_site: FaultSite) -> None:
    fault_site.add_fault("/item/k0000[0-4]", Fault.status(503))
    fault_site.add_fault("/item/k00005", Fault.reset())
    assert _get(fault_site.url("/item/k00002"))[0] == 503
    with socket.create_connection(("127.0.0.1", fault_site.port), timeout=5) as sock:
        sock.sendall(b"GET /item/k00005 HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(4096)
    assert "k00005" not in fault_site.expected_keys()
    assert "k00002" not in fault_site.expected_keys() and "k00006" in fault_site.expected_keys()
    assert len(fault_site.expected_keys(js=True)) == 200  # the /js/ twins are not faulted
    fault_site.add_fault("/js/list/1", Fault.hang())
    assert fault_site.expected_keys(js=True) == fault_site.item_keys()[:10]


def test_adhoc_fault_path_and_times(fault_site: FaultSite) -> None:
    fault_site.add_fault("/flaky", Fault.status(500), times=2)
    assert [_get(fault_site.url("/flaky"))[0] for _ in range(3)] == [500, 500, 404]
    fault_site.add_fault(lambda p: p.endswith("k00009"), Fault.status(429), per="request")
    assert _get(fault_site.url("/item/k00009"))[0] == 429
    fault_site.clear_faults()
    assert _get(fault_site.url("/item/k00009"))[0] == 200


def test_per_request_rate_is_seeded() -> None:
    codes = []
    for _ in range(2):
        with FaultSite(seed=5) as site:
            site.add_fault("/item/*", Fault.status(500), rate=0.3, per="request")
            codes.append([_get(site.url("/item/k00001"))[0] for _ in range(40)])
    assert codes[0] == codes[1]
    assert 4 <= codes[0].count(500) <= 20


def test_hang_counts_and_stop_aborts_promptly() -> None:
    site = FaultSite().start()
    site.add_fault("/hang", Fault.hang())
    socks = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", site.port), timeout=5)
        sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(sock)
    deadline = time.monotonic() + 5
    while site.hanging < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert site.hanging == 3 and site.open_connections == 3
    started = time.monotonic()
    site.stop()
    assert time.monotonic() - started < 5
    for sock in socks:
        try:
            assert sock.recv(10) == b""  # closed, not left hanging
        except ConnectionResetError:
            pass
        sock.close()


def test_lognormal_latency_median() -> None:
    lat = Latency.lognormal(0.2, sigma=0.5)
    draws = [lat.draw(0, f"/item/k{i:05d}", 0) for i in range(200)]
    assert 0.16 <= statistics.median(draws) <= 0.24
    assert draws == [lat.draw(0, f"/item/k{i:05d}", 0) for i in range(200)]
    capped = Latency.lognormal(0.2, sigma=2.0, cap=0.3)
    assert max(capped.draw(1, f"/p{i}", 0) for i in range(200)) <= 0.3


def test_latency_is_applied() -> None:
    with FaultSite(latency=Latency.fixed(0.3)) as site:
        started = time.monotonic()
        assert _get(site.start_url)[0] == 200
        assert time.monotonic() - started >= 0.28


@pytest_twisted.ensureDeferred
async def test_wait_until_does_not_block_the_site(fault_site: FaultSite) -> None:
    fault_site.add_fault("/hang", Fault.hang())
    sock = socket.create_connection(("127.0.0.1", fault_site.port), timeout=5)
    sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await wait_until(lambda: fault_site.hanging, timeout=5) == 1
    sock.close()
    await wait_until(lambda: fault_site.hanging == 0, timeout=5)
    with pytest.raises(AssertionError, match="never"):
        await wait_until(lambda: False, timeout=0.1, message="never")


def test_truncate_and_restart_on_same_port() -> None:
    site = FaultSite().start()
    try:
        site.add_fault("/item/k00001", Fault.truncate())
        with socket.create_connection(("127.0.0.1", site.port), timeout=5) as sock:
            sock.sendall(b"GET /item/k00001 HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        promised = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert 0 < len(body) < promised
        url = site.start_url
        site.stop()
        with pytest.raises(urllib.error.URLError):
            _get(url, timeout=2)
        site.start()
        assert site.start_url == url and _get(url)[0] == 200
    finally:
        site.stop()


@deferred_f_from_coro_f
async def test_result_collects_spider_errors(make_fault_site) -> None:
    site = make_fault_site(pages=1, items_per_page=10)
    result = await run_crawl(RaisingSpider, FAST, timeout=30, start_url=site.start_url)
    assert result.finished and len(result.items) == 6
    assert len(result.spider_errors) == 4 and "boom" in result.spider_errors[0][1]
    assert result.stats["spider_exceptions/ValueError"] == 4
