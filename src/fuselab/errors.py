"""The errors a user sees: a leaf module every layer may import, importing nothing of fuselab itself."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in a config, spec or command line: reported as one line, exit code 2."""


__all__ = ["ConfigError"]
