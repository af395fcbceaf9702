"""Language identification with py3langid (its naive Bayes model ships inside the package: no download).

Scores are py3langid's normalised probabilities. Only the first `max_chars` characters are read:
the identifier walks every byte in Python, and a page's language shows in its first paragraphs.
The model loads once per process (about a second), never travels inside a task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from stages.filters import check_fraction, check_non_negative

_IDENTIFIER: Any = None


def identifier() -> Any:
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def identify(text: str, max_chars: int = 2000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the text's language; ("und", 0.0) when there is nothing to read.

    >>> identify("The cat sleeps on the sofa every afternoon while the dog guards the garden.")[0]
    'en'
    >>> identify("Die Katze schläft jeden Nachmittag auf dem Sofa, während der Hund den Garten bewacht.")[0]
    'de'
    >>> identify("  \\n ")
    ('und', 0.0)
    """
    sample = text[:max_chars] if max_chars else text
    if not sample.strip():
        return "und", 0.0
    lang, score = identifier().classify(sample)
    return lang, round(float(score), 4)


@dataclass(frozen=True, kw_only=True)
class LanguageConfig:
    NAME: ClassVar[str] = "language"
    enabled: bool = True  # drop documents outside keep_languages
    record: bool = True  # identify every kept row's language (meta.language) even where the filter is off:
    #                      the data report and the GX gate read the language share from it
    keep_languages: tuple[str, ...] = ("en",)
    min_confidence: float = 0.5
    max_chars: int = 2000  # characters read per document (0 = all)

    def __post_init__(self) -> None:
        check_fraction(self, "min_confidence")
        check_non_negative(self, "max_chars")
        if isinstance(self.keep_languages, str):  # `language.keep_languages=en` on the command line
            object.__setattr__(self, "keep_languages", (self.keep_languages,))
        object.__setattr__(self, "keep_languages", tuple(self.keep_languages))
        if not self.keep_languages:
            raise ValueError(f"{self.NAME}.keep_languages must name at least one language (or set "
                             f"{self.NAME}.enabled=false)")

    def judge(self, lang: str, score: float) -> tuple[bool, str]:
        """(keep, reason) for an identified language.

        >>> LanguageConfig().judge("fr", 0.99), LanguageConfig().judge("en", 0.2)
        ((False, 'other_language'), (False, 'low_confidence'))
        """
        if lang not in self.keep_languages:
            return False, "other_language"
        if score < self.min_confidence:
            return False, "low_confidence"
        return True, ""

    def __call__(self, text: str) -> tuple[bool, str]:
        return self.judge(*identify(text, self.max_chars))
