"""scrapy-antideadlock: prevent, detect and recover Scrapy crawl deadlocks.

Enable everything with ``ADDONS = {"scrapy_antideadlock.Addon": 0}``.
"""

from .addon import Addon

__version__ = "0.1.0"
__all__ = ["Addon", "__version__"]
