"""The package's exceptions: one base, split by who must act.

- :class:`DataError`: one input (a message, a line, a record) is bad. The stage that meets it
  turns it into a ``rejected/malformed`` output (or skips and counts it, on a changelog) and
  goes on; it never stops a stage.
- :class:`ConfigError`: a setting is wrong. Raised at start, with a message naming the key; the
  CLI prints it and exits 2.

Both derive from ``ValueError`` as well, so code that caught the bare ``ValueError`` they
replace still catches them.
"""

from __future__ import annotations


class InfoGrowthError(Exception):
    """Base of every error this package raises on purpose."""


class DataError(InfoGrowthError, ValueError):
    """One piece of input is bad: it becomes data (``rejected/malformed``), not a crash."""


class ConfigError(InfoGrowthError, ValueError):
    """A setting is invalid; the message names the key."""
