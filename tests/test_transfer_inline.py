"""The inline transfer's edge cases (downloader/transfer.py), on a bare asyncio loop.

The crawl-level behaviour (a hung transfer of Scrapy's handler cut at its deadline,
hedges winning) is in test_downloader.py and test_retry_tail.py; these are the orders
of events a crawl produces too rarely to test there. The handler is a few futures the
test resolves: what it stands for is the wrapped handler's awaits.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from scrapy import Request

from scrapy_antideadlock.downloader.inflight import InFlightDownload
from scrapy_antideadlock.downloader.transfer import inline, start_copy
from scrapy_antideadlock.exceptions import DeadlineExceeded


class Handler:
    """``download_request`` awaits a future per call, resolved by the test."""

    def __init__(self) -> None:
        self.calls: list[asyncio.Future[Any]] = []

    async def download_request(self, request: Request) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.calls.append(future)
        return await future


class Guard:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def inc(self, name: str, count: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + count


def entry() -> InFlightDownload:
    return InFlightDownload(Request("http://example.invalid/a"), "o1", 0.0, None, "transfer")


def begin(guard: Guard, e: InFlightDownload, handler: Handler) -> asyncio.Future[Any]:
    """The inline transfer in a task of its own (standing for Scrapy's download task)."""
    async def download() -> Any:
        return await inline(guard, e, handler, e.request, asyncio.current_task())  # type: ignore[arg-type]

    return asyncio.ensure_future(download())


async def hedged() -> tuple[Handler, Guard, InFlightDownload, asyncio.Future[Any]]:
    """An inline transfer whose hedge (the second copy) has started."""
    handler, guard, e = Handler(), Guard(), entry()
    task = begin(guard, e, handler)
    await until(lambda: handler.calls)
    start_copy(guard, e)  # type: ignore[arg-type]
    await until(lambda: len(handler.calls) == 2)
    return handler, guard, e, task


async def until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def run(coro: Any) -> Any:
    """On a private loop in its own thread: pytest-twisted owns this thread's loop."""
    with ThreadPoolExecutor(1) as executor:
        return executor.submit(asyncio.run, asyncio.wait_for(coro, 5)).result(timeout=10)


def test_a_cancel_interrupts_the_calling_task_and_raises_an_ordinary_exception() -> None:
    async def main() -> None:
        handler, guard, e = Handler(), Guard(), entry()

        task = begin(guard, e, handler)
        await until(lambda: handler.calls)
        e.cancel_exc = DeadlineExceeded(1.0, 1.0, "transfer")
        assert e.wake() and e.interrupted
        assert e.wake()  # a second wake: still one interrupt
        with pytest.raises(DeadlineExceeded):
            await task
        assert handler.calls[0].cancelled()  # the transfer itself was cancelled
        assert e.task is None and not e.wake()  # nothing waits any more
    run(main())


def test_interrupted_while_its_answer_is_on_the_way() -> None:
    async def main() -> None:
        handler, guard, e = Handler(), Guard(), entry()
        outcome: list[Any] = []

        async def download() -> None:
            task = asyncio.current_task()
            assert task is not None
            try:
                outcome.append(await inline(guard, e, handler, e.request, task))  # type: ignore[arg-type]
            except DeadlineExceeded as exc:
                outcome.append(exc)
            if sys.version_info >= (3, 11):
                outcome.append(task.cancelling())

        task = asyncio.ensure_future(download())
        await until(lambda: handler.calls)
        handler.calls[0].set_result("response")  # the task is now ready, not waiting
        e.cancel_exc = DeadlineExceeded(1.0, 1.0, "transfer")
        e.wake()
        await task
        assert isinstance(outcome[0], DeadlineExceeded)
        assert outcome[1:] in ([], [0])  # our cancel was taken back
    run(main())


def test_a_shutdown_cancel_is_not_turned_into_our_exception() -> None:
    if sys.version_info < (3, 11):
        pytest.skip("Task.uncancel (telling our cancel from another's) is Python 3.11+")

    async def main() -> None:
        handler, guard, e = Handler(), Guard(), entry()

        task = begin(guard, e, handler)
        await until(lambda: handler.calls)
        e.cancel_exc = DeadlineExceeded(1.0, 1.0, "transfer")
        task.cancel()  # Scrapy's own shutdown, say
        e.wake()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(main())


@pytest.mark.parametrize("copy_answers", [True, False])
def test_the_first_copy_fails_while_its_hedge_runs(copy_answers: bool) -> None:
    async def main() -> None:
        handler, guard, e, task = await hedged()
        handler.calls[0].set_exception(ConnectionError("first"))
        await asyncio.sleep(0)
        if copy_answers:
            handler.calls[1].set_result("copy's")
            assert await task == "copy's"
            assert e.hedge == "won"
        else:
            handler.calls[1].set_exception(ConnectionError("copy"))
            with pytest.raises(ConnectionError, match="first"):
                await task
            assert e.hedge == "running"
        assert guard.counts.get("antideadlock/deadline/hedge_wins", 0) == int(copy_answers)
    run(main())


def test_a_hedge_answering_first_wins_and_the_first_copy_is_cancelled() -> None:
    async def main() -> None:
        handler, guard, e, task = await hedged()
        handler.calls[1].set_result("copy's")
        assert await task == "copy's"
        assert handler.calls[0].cancelled() and e.hedge == "won"
        assert guard.counts["antideadlock/deadline/hedges"] == 1
    run(main())
