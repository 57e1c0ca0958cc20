"""The start-up check of the Scrapy internals the pack relies on."""

from __future__ import annotations

import pytest
from scrapy.utils.test import get_crawler

from scrapy_antideadlock import Addon, compat


def test_installed_scrapy_has_every_internal():
    names = [r.name for r in compat.requirements()]
    assert "scrapy.core.engine._Slot.inprogress/nextcall/remove_request" in names
    compat.check()  # raises if anything moved


def test_a_moved_internal_fails_at_start_naming_it(monkeypatch):
    monkeypatch.setattr(compat, "_REQUIREMENTS", list(compat._REQUIREMENTS))
    compat.require("scrapy.core.engine.ExecutionEngine._gone", "a feature", lambda: False)
    with pytest.raises(compat.CompatError, match=r"ExecutionEngine\._gone \(a feature\)"):
        get_crawler(settings_dict={"ADDONS": {Addon: 0}})
