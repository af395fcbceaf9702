"""C4's rules (Raffel et al. 2020, section 2.2), line removal and document drops in one pass.

Lines are kept only if they end in terminal punctuation (an ellipsis does not count), have at least
`min_words_per_line` words, no word longer than `max_word_length`, and mention neither "javascript"
nor a cookie/terms-of-use phrase; Wikipedia-style citation marks are removed first. A document is
dropped if it contains "lorem ipsum", optionally if it contains a curly brace (C4's crude code
detector), and if fewer than `min_sentences` sentences remain. Blank lines go as in C4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from stages.filters import check_non_negative

TERMINAL = (".", "?", "!", '"', "'", "”", "’")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                  "use cookies")
CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


def count_sentences(line: str) -> int:
    """Sentence ends (terminal punctuation followed by a space or the end), at least 1 for a kept line.

    >>> count_sentences("One. Two! Is it 3.5? Yes")
    3
    >>> count_sentences("Version 3.11 is out.")
    1
    """
    return len(SENTENCE_END.findall(line)) or 1


@dataclass(frozen=True, kw_only=True)
class C4Config:
    NAME: ClassVar[str] = "c4"
    enabled: bool = True
    remove_no_terminal_punct_lines: bool = True
    min_words_per_line: int = 3
    max_word_length: int = 1000  # 0 = no limit
    remove_citations: bool = True
    remove_javascript_lines: bool = True
    remove_policy_lines: bool = True
    drop_lorem_ipsum: bool = True
    drop_curly_brace: bool = False  # C4 drops them; off by default since it drops every page with code
    min_sentences: int = 5

    def __post_init__(self) -> None:
        check_non_negative(self, "min_words_per_line", "max_word_length", "min_sentences")

    def __call__(self, text: str) -> tuple[str | None, str]:
        """(the text with C4's lines removed, "") or (None, the reason the document goes).

        >>> C4Config(min_sentences=1)("Home | About\\nWe sell fine tea from Assam.\\nEnable JavaScript to see this page.")
        ('We sell fine tea from Assam.', '')
        """
        lower = text.lower()
        if self.drop_lorem_ipsum and "lorem ipsum" in lower:
            return None, "lorem_ipsum"
        if self.drop_curly_brace and "{" in text:
            return None, "curly_brace"
        kept: list[str] = []
        sentences = 0
        check_javascript = self.remove_javascript_lines and "javascript" in lower
        check_policy = self.remove_policy_lines and any(p in lower for p in POLICY_PHRASES)
        for line in text.split("\n"):
            line = line.strip()
            if not line:
                continue
            if self.remove_citations and "[" in line:
                line = CITATION.sub("", line).strip()
            if self.remove_no_terminal_punct_lines and (not line.endswith(TERMINAL) or line.endswith("...")):
                continue
            words = line.split()
            if len(words) < self.min_words_per_line:
                continue
            if self.max_word_length and max(map(len, words)) > self.max_word_length:
                continue
            if check_javascript or check_policy:
                low = line.lower()
                if check_javascript and "javascript" in low:
                    continue
                if check_policy and any(p in low for p in POLICY_PHRASES):
                    continue
            if self.min_sentences:
                sentences += count_sentences(line)
            kept.append(line)
        if not kept:
            return None, "no_lines_left"
        if sentences < self.min_sentences:
            return None, "min_sentences"
        return "\n".join(kept), ""
