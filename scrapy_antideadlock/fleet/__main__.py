"""``python -m scrapy_antideadlock.fleet status [--url URL] [--prefix P] [--json]``."""

import sys

from .status import main

sys.exit(main())
