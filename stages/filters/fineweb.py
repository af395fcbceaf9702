"""FineWeb's line rules (Penedo et al. 2024): documents whose lines look like navigation, lists or boilerplate.

Over non-blank lines: too few ending in terminal punctuation, too many short lines, too many
characters in repeated lines, or many more newlines than a paragraph of prose has (list-like).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from stages.filters import check_fraction, check_non_negative
from stages.filters.gopher import duplicate_fractions

TERMINAL = (".", "?", "!", '"', "'", "”", "’", "…", ":", ";", ")", "。", "！", "？")


@dataclass(frozen=True, kw_only=True)
class FineWebConfig:
    NAME: ClassVar[str] = "fineweb"
    enabled: bool = True
    min_line_punct_fraction: float = 0.12  # lines ending in terminal punctuation
    max_short_line_fraction: float = 0.67
    short_line_chars: int = 30
    max_duplicate_line_char_fraction: float = 0.01
    max_newline_to_word_ratio: float = 0.3  # list-like documents

    def __post_init__(self) -> None:
        check_fraction(self, "min_line_punct_fraction", "max_short_line_fraction", "max_duplicate_line_char_fraction")
        check_non_negative(self, "short_line_chars", "max_newline_to_word_ratio")

    def __call__(self, text: str) -> tuple[bool, str]:
        """(keep, the first rule failed or "").

        >>> FineWebConfig()("Home\\nProducts\\nContact\\nLogin")
        (False, 'line_punct')
        """
        lines = [line.strip() for line in text.split("\n")]
        lines = [line for line in lines if line]
        if not lines:
            return False, "empty"
        n = len(lines)
        if sum(line.endswith(TERMINAL) for line in lines) / n < self.min_line_punct_fraction:
            return False, "line_punct"
        if sum(len(line) <= self.short_line_chars for line in lines) / n > self.max_short_line_fraction:
            return False, "short_lines"
        if duplicate_fractions(lines)[1] > self.max_duplicate_line_char_fraction:
            return False, "duplicate_line_chars"
        words = len(text.split())
        if words and text.count("\n") / words > self.max_newline_to_word_ratio:
            return False, "list_like"
        return True, ""
