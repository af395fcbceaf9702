"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", appendix A, table A1).

Words are whitespace-separated tokens, as in the paper; a "symbol word" consists of punctuation only
and does not count towards the word-count and mean-length rules. Character fractions are over word
characters (whitespace excluded), so a document's layout does not change its verdict.

Repetition needs every n-gram of the document for n = 2..10; instead of building nine lists of
joined strings, each word becomes its (per-process) string hash and n-grams are rolling
polynomial hashes in numpy, so one document costs a few `np.unique` calls whatever its length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from stages.filters import check_fraction, check_non_negative

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
# A word made only of these is a "symbol word" (Gopher counts words, not punctuation).
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…–—‘’“”«»„‚•·¡¿§¶†‡′″°±×÷"
BULLETS = ("•", "-", "*", "·", "‣", "◦", "▪", "●", "–", "—")
ELLIPSES = ("...", "…")
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
ALPHA = re.compile(r"[^\W\d_]")  # any Unicode letter
PRIME = np.uint64(1_000_000_007)


def duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(share of items repeating an earlier one, share of characters in those repeats).

    >>> duplicate_fractions(["a b", "cc", "a b", "d"])
    (0.25, 0.3333333333333333)
    >>> duplicate_fractions([])
    (0.0, 0.0)
    """
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = total = 0
    for item in items:
        total += len(item)
        if item in seen:
            dup += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup / len(items), (dup_chars / total if total else 0.0)


def ngram_fractions(words: list[str], top_ns: tuple[int, ...] = (2, 3, 4),
                    dup_ns: tuple[int, ...] = (5, 6, 7, 8, 9, 10)) -> dict[int, float]:
    """n -> character fraction: of the most frequent n-gram (n in `top_ns`, only if it repeats), or
    covered by n-grams that occurred earlier in the text (n in `dup_ns`, overlaps counted once).

    >>> f = ngram_fractions("a b c a b c a b c x".split(), top_ns=(2,), dup_ns=(3,))
    >>> round(f[2], 2), round(f[3], 2)
    (0.6, 0.6)
    >>> ngram_fractions("every word here is new".split(), top_ns=(2,), dup_ns=(5,))
    {2: 0.0, 5: 0.0}
    """
    n_words = len(words)
    out = {n: 0.0 for n in (*top_ns, *dup_ns)}
    max_n = max(out, default=0)
    if n_words < 2 or max_n < 2:
        return out
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=n_words)
    total = float(lengths.sum())
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=n_words).view(np.uint64)
    cum = np.concatenate(([0], np.cumsum(lengths)))
    h = ids
    for n in range(2, min(max_n, n_words) + 1):
        h = h[:-1] * PRIME + ids[n - 1:]  # uint64 arithmetic wraps: a rolling hash of words i..i+n-1
        if n not in out:
            continue
        _, first, inverse, counts = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
        if len(counts) == len(h):
            break  # no n-gram repeats, so no longer one does either: the rest stay 0
        if n in top_ns:
            per_position = counts[inverse]
            best = per_position.max()
            chars = cum[n:] - cum[:-n]
            out[n] = float(best * chars[per_position == best].max()) / total
        if n in dup_ns:
            starts = np.flatnonzero(first[inverse] != np.arange(len(h)))
            if len(starts):
                depth = np.cumsum(np.bincount(starts, minlength=n_words + 1)
                                  - np.bincount(starts + n, minlength=n_words + 1))[:n_words]
                out[n] = float(lengths[depth > 0].sum()) / total
    return out


@dataclass(frozen=True, kw_only=True)
class GopherQualityConfig:
    NAME: ClassVar[str] = "gopher_quality"
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_to_word_ratio: float = 0.1  # '#' and, separately, ellipses per word
    max_bullet_line_fraction: float = 0.9
    max_ellipsis_line_fraction: float = 0.3
    min_alpha_word_fraction: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # distinct words of `stop_words` present (case-insensitive)
    stop_words: tuple[str, ...] = STOP_WORDS

    def __post_init__(self) -> None:
        check_non_negative(self, "min_words", "min_mean_word_length", "max_symbol_to_word_ratio", "min_stop_words")
        if self.max_words < max(self.min_words, 1):
            raise ValueError(f"{self.NAME}.max_words must be >= min_words and >= 1, got {self.max_words}")
        if self.max_mean_word_length < self.min_mean_word_length:
            raise ValueError(f"{self.NAME}.max_mean_word_length must be >= min_mean_word_length, "
                             f"got {self.max_mean_word_length} < {self.min_mean_word_length}")
        check_fraction(self, "max_bullet_line_fraction", "max_ellipsis_line_fraction", "min_alpha_word_fraction")
        if self.min_stop_words > len(set(self.stop_words)):
            raise ValueError(f"{self.NAME}.min_stop_words ({self.min_stop_words}) exceeds the number of "
                             f"stop_words ({len(set(self.stop_words))})")
        object.__setattr__(self, "stop_words", tuple(w.lower() for w in self.stop_words))

    def __call__(self, text: str) -> tuple[bool, str]:
        """(keep, the first rule failed or "")."""
        words = text.split()
        n = len(words)
        content = [w for w in words if w.strip(PUNCTUATION)]
        n_content = len(content)
        if n_content < self.min_words:
            return False, "min_words"
        if n_content > self.max_words:
            return False, "max_words"
        if n_content:
            mean = sum(map(len, content)) / n_content
            if not self.min_mean_word_length <= mean <= self.max_mean_word_length:
                return False, "mean_word_length"
        if n and (text.count("#") / n > self.max_symbol_to_word_ratio
                  or (text.count("...") + text.count("…")) / n > self.max_symbol_to_word_ratio):
            return False, "symbol_ratio"
        lines = [line.strip() for line in text.split("\n")]
        lines = [line for line in lines if line] or [""]
        if sum(line.startswith(BULLETS) for line in lines) / len(lines) > self.max_bullet_line_fraction:
            return False, "bullet_lines"
        if sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > self.max_ellipsis_line_fraction:
            return False, "ellipsis_lines"
        if n and sum(1 for w in words if ALPHA.search(w)) / n < self.min_alpha_word_fraction:
            return False, "alpha_words"
        if self.min_stop_words:
            found = {w.strip(PUNCTUATION).lower() for w in words if len(w) <= 6}  # stop words are short
            if len(found.intersection(self.stop_words)) < self.min_stop_words:
                return False, "stop_words"
        return True, ""


@dataclass(frozen=True, kw_only=True)
class GopherRepetitionConfig:
    NAME: ClassVar[str] = "gopher_repetition"
    enabled: bool = True
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_paragraph_fraction: float = 0.3
    max_duplicate_line_char_fraction: float = 0.2
    max_duplicate_paragraph_char_fraction: float = 0.2
    # (n, max character fraction of the most frequent n-gram)
    top_ngram_fractions: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    # (n, max character fraction covered by repeated n-grams)
    duplicate_ngram_fractions: tuple[tuple[int, float], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))

    def __post_init__(self) -> None:
        check_fraction(self, "max_duplicate_line_fraction", "max_duplicate_paragraph_fraction",
                       "max_duplicate_line_char_fraction", "max_duplicate_paragraph_char_fraction")
        for name in ("top_ngram_fractions", "duplicate_ngram_fractions"):
            try:
                pairs = tuple((int(n), float(f)) for n, f in getattr(self, name))
            except (TypeError, ValueError):
                raise ValueError(f"{self.NAME}.{name} must be pairs (n, fraction), got {getattr(self, name)!r}") from None
            if any(n < 2 or not 0.0 <= f <= 1.0 for n, f in pairs):
                raise ValueError(f"{self.NAME}.{name}: each n must be >= 2 and each fraction in [0, 1], got {pairs}")
            object.__setattr__(self, name, pairs)

    def __call__(self, text: str) -> tuple[bool, str]:
        paragraphs = [p.strip() for p in PARAGRAPH_BREAK.split(text.strip())]
        frac, char_frac = duplicate_fractions(paragraphs)
        if frac > self.max_duplicate_paragraph_fraction:
            return False, "duplicate_paragraphs"
        if char_frac > self.max_duplicate_paragraph_char_fraction:
            return False, "duplicate_paragraph_chars"
        lines = [line.strip() for line in text.split("\n")]
        frac, char_frac = duplicate_fractions([line for line in lines if line])
        if frac > self.max_duplicate_line_fraction:
            return False, "duplicate_lines"
        if char_frac > self.max_duplicate_line_char_fraction:
            return False, "duplicate_line_chars"
        words = text.split()
        top = dict(self.top_ngram_fractions)
        dup = dict(self.duplicate_ngram_fractions)
        fractions = ngram_fractions(words, tuple(top), tuple(dup))
        for n, limit in self.top_ngram_fractions:
            if fractions[n] > limit:
                return False, f"top_{n}_gram"
        for n, limit in self.duplicate_ngram_fractions:
            if fractions[n] > limit:
                return False, f"duplicate_{n}_gram"
        return True, ""
