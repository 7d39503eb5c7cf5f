"""Base class of the configuration's choices (``adapter.mode``, ``deepspeed.precision``, ...).

A choice is a string Enum field of the structured config: OmegaConf checks it when the config is
composed (the message lists the valid values) and code downstream compares it with plain strings
(``precision == "bf16"``) or formats it (``f"{mode}"`` gives ``matrix``), trusting it.
"""

from __future__ import annotations

import enum

__all__ = ["StrEnum"]

if hasattr(enum, "StrEnum"):  # Python 3.11+
    StrEnum = enum.StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, enum.Enum):
        __str__ = str.__str__
        __format__ = str.__format__
