"""Every stat the pack emits, with a one-line meaning (the README stats table is checked
against this module by a test).

Names are ``antideadlock/<part>/<name>``. A ``{placeholder}`` stands for a family
(e.g. ``antideadlock/pg/retries/{sqlstate}``). Components should use these
constants rather than string literals so a typo cannot create a stat nobody reads.
"""

from __future__ import annotations

import re

STATS: dict[str, str] = {}


def _stat(name: str, meaning: str) -> str:
    full = f"antideadlock/{name}"
    if full in STATS:
        raise RuntimeError(f"stat {full} declared twice")
    STATS[full] = meaning
    return full


def family(template: str, **values: object) -> str:
    """Fill a declared ``{placeholder}`` stat name, e.g. family(PG_RETRIES, sqlstate="40P01")."""
    if template not in STATS:
        raise KeyError(f"undeclared stat family {template}")
    return template.format(**values)


def is_declared(name: str) -> bool:
    """True if ``name`` is a declared stat or an instance of a declared family."""
    if name in STATS:
        return True
    for template in STATS:
        if "{" in template:
            pattern = re.escape(template)
            pattern = re.sub(r"\\\{[a-z_]+\\\}", r"[^/]+", pattern)
            if re.fullmatch(pattern, name):
                return True
    return False


# ---- deadline ----------------------------------------------------------------------------
# (section owned by the downloader middleware)

# ---- proxy -------------------------------------------------------------------------------
# (section owned by the downloader middleware)

# ---- pg ----------------------------------------------------------------------------------
# (section owned by the PostgreSQL pipeline)

# ---- playwright ----------------------------------------------------------------------------
# (section owned by the Playwright handler)

# ---- watchdog ----------------------------------------------------------------------------
# (section owned by the watchdog)

# ---- journal / health ----------------------------------------------------------------------
# (section owned by the journal and liveness outputs)
