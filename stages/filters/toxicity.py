"""Toxicity and adult-content filter: a word list by default, optionally a Hugging Face classifier.

The word list (one word per line, `#` comments) matches whole words, case-insensitively; a
document goes when it has at least `max_matches` hits, or when hits are more than
`max_match_fraction` of its words (one slur in a tweet-sized text is not one in a book chapter).

The classifier is any sequence-classification directory (`save_pretrained` output:
`AutoModelForSequenceClassification` and its tokenizer) given as `classifier_dir`; a document goes
when the probability of `classifier_label` is at least `classifier_threshold`. It runs in batches
over the documents every other filter kept, and loads once per process.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from stages.filters import check_fraction, check_non_negative

DEFAULT_WORDLIST = Path(__file__).parent / "wordlists" / "en.txt"


def read_wordlist(path: Path) -> tuple[str, ...]:
    words = (line.strip().lower() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return tuple(sorted({w for w in words if w and not w.startswith("#")}))


@functools.lru_cache(maxsize=8)
def wordlist_pattern(path: str) -> re.Pattern[str]:
    words = read_wordlist(Path(path))
    if not words:
        return re.compile(r"(?!x)x")  # matches nothing
    # longest first, so "fucker" is one hit rather than "fuck" + a failed boundary
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def count_matches(text: str, pattern: re.Pattern[str]) -> int:
    """Whole-word hits of the list in the text.

    >>> p = re.compile(r"(?<!\\w)(?:spam|eggs)(?!\\w)", re.IGNORECASE)
    >>> count_matches("Spam, eggs and spamalot; SPAM!", p)
    3
    """
    return sum(1 for _ in pattern.finditer(text))


@dataclass(frozen=True, kw_only=True)
class ToxicityConfig:
    NAME: ClassVar[str] = "toxicity"
    enabled: bool = True
    wordlist: Path | None = None  # None: the short built-in English list (stages/filters/wordlists/en.txt)
    max_matches: int = 3
    max_match_fraction: float = 0.01
    classifier_dir: Path | None = None  # a save_pretrained sequence-classification model + tokenizer
    classifier_label: str = "toxic"
    classifier_threshold: float = 0.5
    classifier_max_tokens: int = 512
    classifier_batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_matches < 1:
            raise ValueError(f"{self.NAME}.max_matches must be >= 1, got {self.max_matches}")
        check_fraction(self, "max_match_fraction", "classifier_threshold")
        check_non_negative(self, "classifier_max_tokens")
        if self.classifier_batch_size < 1:
            raise ValueError(f"{self.NAME}.classifier_batch_size must be >= 1, got {self.classifier_batch_size}")
        if self.wordlist is not None and not Path(self.wordlist).is_file():
            raise ValueError(f"{self.NAME}.wordlist: no such file {self.wordlist}")
        if self.classifier_dir is not None and not (Path(self.classifier_dir) / "config.json").is_file():
            raise ValueError(f"{self.NAME}.classifier_dir: no config.json in {self.classifier_dir}")

    @property
    def wordlist_path(self) -> Path:
        return Path(self.wordlist) if self.wordlist is not None else DEFAULT_WORDLIST

    def __call__(self, text: str) -> tuple[bool, str]:
        """(keep, reason) from the word list; the classifier is `classifier_scores` over a batch."""
        hits = count_matches(text, wordlist_pattern(str(self.wordlist_path)))
        if hits and (hits >= self.max_matches or hits / max(len(text.split()), 1) > self.max_match_fraction):
            return False, "wordlist"
        return True, ""

    def classifier_scores(self, texts: list[str]) -> np.ndarray:
        """Probability of `classifier_label` for each text."""
        if self.classifier_dir is None or not texts:
            return np.zeros(len(texts))
        return classifier_scores(str(self.classifier_dir), self.classifier_label, texts,
                                 self.classifier_max_tokens, self.classifier_batch_size)


@functools.lru_cache(maxsize=2)
def load_classifier(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if tokenizer.pad_token is None:  # batches need padding; any existing token will do under the mask
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer, model


def label_index(id2label: dict[int, str], label: str) -> int:
    """The class index of `label` (case-insensitive), or ValueError listing the labels there are.

    >>> label_index({0: "neutral", 1: "TOXIC"}, "toxic")
    1
    """
    for i, name in id2label.items():
        if str(name).lower() == label.lower():
            return int(i)
    raise ValueError(f"toxicity.classifier_label {label!r} is not a label of the classifier "
                     f"(labels: {', '.join(map(str, id2label.values()))})")


def classifier_scores(path: str, label: str, texts: list[str], max_tokens: int, batch_size: int) -> np.ndarray:
    import torch

    tokenizer, model = load_classifier(path)
    index = label_index(model.config.id2label, label)
    multi_label = model.config.problem_type == "multi_label_classification"
    scores: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], truncation=True, padding=True,
                          max_length=max_tokens or None, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**batch).logits.float()
        probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
        scores.append(probs[:, index].numpy())
    return np.concatenate(scores)
