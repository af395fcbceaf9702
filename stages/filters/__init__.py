"""Document filters of the clean stage, one module per family, each a frozen config that is its own filter.

    GopherQualityConfig(min_words=50)("some text")    # -> (keep, reason)
    C4Config()("some text")                             # -> (new text or None, reason)
    PIIConfig()("mail me at a@b.org")                   # -> (redacted text, {kind: count})

A filter config is a frozen, keyword-only dataclass with `enabled` and validated thresholds, so the
clean stage can nest it in its own config (`gopher_quality.min_words=20` on the command line) and
override it per source. Reasons are short fixed names (`min_words`, `top_2_gram`), never free text,
so counts per reason add up across shards.
"""

from __future__ import annotations

from typing import Any


def check_fraction(cfg: Any, *names: str) -> None:
    """Raise ValueError naming the first field outside [0, 1], as `<filter>.<field>` (how configs spell it)."""
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{cfg.NAME}.{name} must be in [0, 1], got {value}")


def check_non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 0:
            raise ValueError(f"{cfg.NAME}.{name} must be >= 0, got {value}")
