"""Settings: bad values fail at start naming the setting and the accepted form."""

from __future__ import annotations

import pytest
from scrapy.settings import Settings

from scrapy_antideadlock import settings as ad
from scrapy_antideadlock.addon import Addon
from scrapy_antideadlock.settings import SettingError


def test_defaults_load_per_part():
    deadline = ad.load(Settings(), "deadline")
    assert deadline.multiplier == 3.0
    assert deadline.min_samples == 20
    assert deadline.enabled is True


def test_strings_from_the_command_line_are_parsed():
    s = Settings({"ANTIDEADLOCK_DEADLINE_MULTIPLIER": "2.5", "ANTIDEADLOCK_ENABLED": "false",
                  "ANTIDEADLOCK_DEADLINE_MIN_SAMPLES": "5"})
    assert ad.get(s, "ANTIDEADLOCK_DEADLINE_MULTIPLIER") == 2.5
    assert ad.get(s, "ANTIDEADLOCK_ENABLED") is False
    assert ad.get(s, "ANTIDEADLOCK_DEADLINE_MIN_SAMPLES") == 5


@pytest.mark.parametrize(("name", "value"), [
    ("ANTIDEADLOCK_DEADLINE_MULTIPLIER", "abc"),
    ("ANTIDEADLOCK_DEADLINE_MULTIPLIER", -1),
    ("ANTIDEADLOCK_DEADLINE_MIN", 0),
    ("ANTIDEADLOCK_DEADLINE_MIN_SAMPLES", 2.5),
    ("ANTIDEADLOCK_ENABLED", "maybe"),
    ("ANTIDEADLOCK_DEADLINE_BUFFER", float("inf")),
    ("ANTIDEADLOCK_JOURNAL_FLUSH_INTERVAL", 0),
    ("ANTIDEADLOCK_JOURNAL_FLUSH_INTERVAL", "soon"),
])
def test_bad_value_names_setting_and_accepted_form(name, value):
    with pytest.raises(SettingError) as info:
        ad.get(Settings({name: value}), name)
    assert name in str(info.value)
    assert "expected" in str(info.value)


def test_bounds_out_of_order_fail_at_start():
    s = Settings({"ANTIDEADLOCK_DEADLINE_MIN": 90, "ANTIDEADLOCK_DEADLINE_MAX": 60})
    with pytest.raises(SettingError, match="ANTIDEADLOCK_DEADLINE_MIN: expected a value <= "
                                           "ANTIDEADLOCK_DEADLINE_MAX"):
        ad.validate_all(s)
    ad.validate_all(Settings({"ANTIDEADLOCK_DEADLINE_MIN": 60, "ANTIDEADLOCK_DEADLINE_MAX": 60}))


def test_unknown_setting_is_a_typo_with_a_suggestion():
    s = Settings({"ANTIDEADLOCK_DEADLINE_MULTIPLER": 2})
    with pytest.raises(SettingError, match="did you mean ANTIDEADLOCK_DEADLINE_MULTIPLIER"):
        ad.validate_all(s)
    ad.validate_all(Settings({"ANTIDEADLOCK_DEADLINE_MULTIPLER": 2,
                              "ANTIDEADLOCK_STRICT_SETTINGS": False}))


def test_secret_values_are_not_echoed():
    err = SettingError("ANTIDEADLOCK_PG_DSN", "a DSN", "postgresql://u:hunter2@h/db")
    assert "hunter2" not in str(err)


def test_proxy_capacities_forms():
    assert ad.proxy_capacities(["http://a:1", "http://b:2"]) == {"http://a:1": None,
                                                                "http://b:2": None}
    assert ad.proxy_capacities({"http://a:1": 3}) == {"http://a:1": 3}
    assert ad.proxy_capacities("http://a:1, http://b:2") == {"http://a:1": None,
                                                             "http://b:2": None}
    assert ad.proxy_capacities('{"http://a:1": 2}') == {"http://a:1": 2}
    with pytest.raises(ValueError):
        ad.proxy_capacities(["a:1"])
    with pytest.raises(ValueError):
        ad.proxy_capacities({"http://a:1": 0})


def test_addon_validates_at_start():
    s = Settings({"ANTIDEADLOCK_DEADLINE_MAX": "soon"})
    with pytest.raises(SettingError, match="ANTIDEADLOCK_DEADLINE_MAX"):
        Addon().update_settings(s)


def test_addon_master_switch_enables_nothing():
    s = Settings({"ANTIDEADLOCK_ENABLED": False})
    before = {k: dict(s.getdict(k)) for k in ("DOWNLOADER_MIDDLEWARES", "ITEM_PIPELINES",
                                               "EXTENSIONS", "DOWNLOAD_HANDLERS")}
    Addon().update_settings(s)
    after = {k: dict(s.getdict(k)) for k in before}
    assert before == after
