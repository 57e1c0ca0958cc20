"""Signals the pack sends through ``crawler.signals`` (use plain-function handlers)."""

#: The watchdog found a stall. Args: ``diagnosis`` (:class:`scrapy_antideadlock.watchdog.Diagnosis`;
#: it reads like its ``to_dict()`` form too: ``diagnosis["class"]``).
stall_detected = object()
#: Progress resumed after a stall. Args: ``stall_class`` (str), ``duration`` (float seconds).
stall_cleared = object()
#: A download was cancelled by the guarded handler. Args: ``request``, ``reason`` (str).
download_cancelled = object()
