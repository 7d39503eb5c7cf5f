"""Shared start-up for the entry points: make the package importable from a checkout, and turn
configuration errors into one clear line instead of a traceback."""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def friendly_errors(main):
    """Exit with status 2 and the message of a ConfigError/FileNotFoundError/ValueError from set-up."""
    from mtlora_dist.engine.config import ConfigError

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ConfigError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
