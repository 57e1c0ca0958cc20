"""The ``antideadlock-fault-site`` command serves a fault site in the foreground."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

from scrapy_antideadlock.testing.cli import build_parser, make_site


def test_cli_serves_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "scrapy_antideadlock.testing.cli", "--port", "0", "--pages", "3",
         "--error-rate", "0.5", "--stats-every", "0"],
        stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)/list/0", line)
        assert match, line
        with urllib.request.urlopen(match.group(0), timeout=30) as resp:
            assert resp.status == 200 and b"item-link" in resp.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "stopped after 1 requests" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_fault_rates_are_disjoint_shares() -> None:
    args = build_parser().parse_args(["--pages", "50", "--hang-rate", "0.1",
                                      "--error-rate", "0.1"])
    site = make_site(args)
    unreachable = len(site.item_keys()) - len(site.expected_keys())
    assert 60 <= unreachable <= 140  # about 20 % of 500
