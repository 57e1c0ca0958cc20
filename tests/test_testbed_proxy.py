"""The fault proxy forwards for real, and its slow / black-hole / error / auth modes happen."""

from __future__ import annotations

import base64
import socket
import time
import urllib.error
import urllib.request

import pytest
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_antideadlock.testing import FaultProxy, FaultSite, SiteSpider, run_crawl


def _via(proxy_url: str, url: str, timeout: float = 5.0,
         auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    handler = urllib.request.ProxyHandler({"http": proxy_url})
    opener = urllib.request.build_opener(handler)
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Proxy-Authorization", f"Basic {token}")
    try:
        with opener.open(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_healthy_forwards(fault_site: FaultSite, fault_proxy: FaultProxy) -> None:
    status, body = _via(fault_proxy.url, fault_site.url("/item/k00004"))
    assert status == 200 and b'data-key="k00004"' in body
    assert _via(fault_proxy.url, fault_site.url("/missing"))[0] == 404
    assert fault_proxy.requests == 2 and fault_proxy.by_mode["healthy"] == 2
    assert fault_site.hits["/item/k00004"] == 1  # really went through to the site
    assert fault_proxy.targets[0] == fault_site.url("/item/k00004")


def test_slow_adds_delay(fault_site: FaultSite, make_fault_proxy) -> None:
    proxy = make_fault_proxy(mode="slow", slow_delay=0.7)
    started = time.monotonic()
    assert _via(proxy.url, fault_site.start_url)[0] == 200
    assert time.monotonic() - started >= 0.65


def test_blackhole_never_answers(fault_site: FaultSite, make_fault_proxy) -> None:
    proxy = make_fault_proxy(mode="blackhole")
    started = time.monotonic()
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        _via(proxy.url, fault_site.start_url, timeout=1.0)
    assert 0.9 <= time.monotonic() - started < 10
    assert fault_site.total_requests == 0
    assert proxy.by_mode["blackhole"] == 1


def test_error_and_reset(fault_site: FaultSite, make_fault_proxy) -> None:
    proxy = make_fault_proxy(mode="error")
    assert _via(proxy.url, fault_site.start_url)[0] == 502
    proxy.mode = "reset"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(f"GET {fault_site.start_url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    assert fault_site.total_requests == 0
    with pytest.raises(ValueError, match="mode"):
        proxy.mode = "bogus"


def test_auth(fault_site: FaultSite, make_fault_proxy) -> None:
    proxy = make_fault_proxy(auth=("alice", "s3cret"))
    assert _via(proxy.url, fault_site.start_url)[0] == 407
    assert _via(proxy.url, fault_site.start_url, auth=("alice", "wrong"))[0] == 407
    assert _via(proxy.url, fault_site.start_url, auth=("alice", "s3cret"))[0] == 200
    assert proxy.statuses[407] == 2


def test_mode_switch_at_run_time(fault_site: FaultSite, fault_proxy: FaultProxy) -> None:
    assert _via(fault_proxy.url, fault_site.start_url)[0] == 200
    fault_proxy.mode = "error"
    assert _via(fault_proxy.url, fault_site.start_url)[0] == 502
    fault_proxy.mode = "healthy"
    assert _via(fault_proxy.url, fault_site.start_url)[0] == 200
    assert fault_proxy.by_mode == {"healthy": 2, "error": 1}


def test_stop_aborts_held_connections(fault_site: FaultSite) -> None:
    proxy = FaultProxy(mode="blackhole").start()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(f"GET {fault_site.start_url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    deadline = time.monotonic() + 5
    while proxy.active < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.active == 1
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 5
    try:
        assert sock.recv(10) == b""
    except ConnectionResetError:
        pass
    sock.close()


@deferred_f_from_coro_f
async def test_scrapy_crawl_through_proxy_with_auth(make_fault_site, make_fault_proxy) -> None:
    site = make_fault_site(pages=3, items_per_page=5)
    proxy = make_fault_proxy(auth=("bob", "pw"))
    result = await run_crawl(SiteSpider, {"LOG_LEVEL": "WARNING"}, timeout=30,
                             start_url=site.start_url, proxy=proxy.url_with_auth())
    assert result.finished
    assert sorted(result.keys()) == site.expected_keys()
    assert proxy.requests == site.total_requests == 3 + 15
    assert proxy.statuses[407] == 0


@deferred_f_from_coro_f
async def test_scrapy_crawl_through_blackhole_proxy_hangs(make_fault_site,
                                                          make_fault_proxy) -> None:
    site = make_fault_site(pages=2, items_per_page=2)
    proxy = make_fault_proxy(mode="blackhole")
    result = await run_crawl(SiteSpider, {"LOG_LEVEL": "WARNING"}, timeout=2.5, expect_hang=True,
                             start_url=site.start_url, proxy=proxy.url)
    assert not result.finished and result.items == []
    assert proxy.active == 1 and site.total_requests == 0


def test_connect_tunnel(fault_site: FaultSite, fault_proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", fault_proxy.port), timeout=5) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{fault_site.port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /item/k00007 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b'data-key="k00007"' in data
    assert fault_proxy.targets == [f"127.0.0.1:{fault_site.port}"]


def test_active_counts_transfers_until_done_or_abandoned(fault_site: FaultSite,
                                                         fault_proxy: FaultProxy) -> None:
    from scrapy_antideadlock.testing import Fault

    fault_site.add_fault("/item/k00001", Fault.hang())
    _via(fault_proxy.url, fault_site.url("/item/k00002"))
    # the proxy's thread counts the transfer done just after the client read its last byte
    deadline = time.monotonic() + 5
    while fault_proxy.active != 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert fault_proxy.max_active == 1  # one transfer, ended at its last byte
    client = socket.create_connection((fault_proxy.host, fault_proxy.port))
    client.sendall(f"GET {fault_site.url('/item/k00001')} HTTP/1.1\r\n"
                   f"Host: {fault_proxy.host}\r\n\r\n".encode())
    deadline = time.monotonic() + 5
    while fault_proxy.active != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.close()  # the client gives up on the hung upstream: the transfer is over
    while fault_proxy.active != 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
