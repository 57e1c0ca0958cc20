"""A consent-wall livelock: past the first products the site shows a consent wall (no
product), and the callback re-requests the page with ``dont_filter`` for ever."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..spiders import SiteSpider


class ConsentSpider(SiteSpider):
    name = "consent_wall"

    def parse_item(self, response: Any, **kwargs: Any) -> Iterator[Any]:
        if not response.css("div.item"):
            # "accept" the wall and try again: the site never remembers the choice
            yield response.request.replace(dont_filter=True, cookies={"consent": "yes"})
            return
        yield from super().parse_item(response, **kwargs)


def wall_after(first: int) -> Any:
    """Site fault predicate: product pages past the first ``first`` keys show the wall."""

    def walled(path: str) -> bool:
        key = path.rsplit("/", 1)[-1]
        return path.startswith("/item/k") and key[1:].isdigit() and int(key[1:]) >= first

    return walled
