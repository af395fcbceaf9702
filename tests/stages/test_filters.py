"""Each filter of the clean stage on hand-made texts: one that passes, one that fails each rule."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

from stages import filters
from stages.filters import c4, fineweb, gopher, language, pii, toxicity
from stages.filters.c4 import C4Config
from stages.filters.fineweb import FineWebConfig
from stages.filters.gopher import GopherQualityConfig, GopherRepetitionConfig
from stages.filters.language import LanguageConfig, identify
from stages.filters.pii import PIIConfig, luhn_valid
from stages.filters.toxicity import ToxicityConfig

SHAKESPEARE = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "tinyshakespeare" / "input.txt"

# A web page's worth of ordinary prose: passes every rule with its defaults.
GOOD = (
    "The river town of Ashford has been famous for its bridges since the twelfth century. "
    "Travellers who cross the old stone bridge can see the mill that once ground grain for the whole valley.\n"
    "In spring the meadows along the water fill with wild flowers, and families walk there with their dogs. "
    "The local museum tells the story of the wool trade that made the town rich.\n"
    "Visitors should try the bakery near the market square, which has sold the same apple cake for a hundred years. "
    "Trains from the city arrive every hour, and the station is a short walk from the centre."
)


def test_doctests() -> None:
    for module in (filters, gopher, c4, fineweb, language, pii, toxicity):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_a_good_document_passes_every_filter() -> None:
    assert GopherQualityConfig()(GOOD) == (True, "")
    assert GopherRepetitionConfig()(GOOD) == (True, "")
    assert C4Config()(GOOD) == (GOOD, "")
    assert FineWebConfig()(GOOD) == (True, "")
    assert ToxicityConfig()(GOOD) == (True, "")
    assert LanguageConfig()(GOOD) == (True, "")


@pytest.mark.parametrize("text, rule", [
    ("Too short to be a page, with the words of a note.", "min_words"),
    (" ".join(["word"] * 400), "max_words"),
    (" ".join(["a", "an", "I", "to", "be", "of", "the", "it", "is", "on"] * 6), "mean_word_length"),
    (" ".join(["extraordinarily", "incomprehensibilities", "the", "of"] * 15), "mean_word_length"),
    (GOOD + " " + " ".join(["#tag"] * 20), "symbol_ratio"),
    (GOOD + " " + "... " * 20, "symbol_ratio"),
    ("\n".join(f"- item number {i} of the list with the rest of it" for i in range(10)), "bullet_lines"),
    ("\n".join([GOOD] + [f"and then the story goes on with part {i}…" for i in range(3)]), "ellipsis_lines"),
    (GOOD + " " + " ".join(str(i) for i in range(100, 140)), "alpha_words"),
    (" ".join(["cats", "dogs", "birds", "fish", "mice", "lions", "bears", "wolves"] * 8), "stop_words"),
])
def test_gopher_quality_rules(text: str, rule: str) -> None:
    assert GopherQualityConfig(max_words=300)(text) == (False, rule)


def test_gopher_quality_thresholds_are_configurable() -> None:
    short = "Return the value of x and the name of the file."
    assert GopherQualityConfig()(short) == (False, "min_words")
    assert GopherQualityConfig(min_words=3)(short) == (True, "")
    no_stop = " ".join(["cats", "dogs", "birds", "fish", "mice", "lions", "bears", "wolves"] * 8)
    assert GopherQualityConfig(min_stop_words=0)(no_stop) == (True, "")


def test_gopher_quality_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="gopher_quality.max_words"):
        GopherQualityConfig(min_words=10, max_words=5)
    with pytest.raises(ValueError, match="gopher_quality.min_alpha_word_fraction"):
        GopherQualityConfig(min_alpha_word_fraction=2.0)
    with pytest.raises(ValueError, match="gopher_repetition.top_ngram_fractions"):
        GopherRepetitionConfig(top_ngram_fractions=((1, 0.2),))


LINES = [f"Line number {i} says something different about topic {i * 7}." for i in range(10)]


@pytest.mark.parametrize("text, rule", [
    ("\n\n".join(["A paragraph that repeats itself word for word."] * 3 + LINES[:3]), "duplicate_paragraphs"),
    ("\n\n".join([GOOD, "one more short paragraph here", "and another one", "a third one", GOOD]),
     "duplicate_paragraph_chars"),
    ("\n".join(LINES[:6] + LINES[:3]), "duplicate_lines"),
    ("\n".join(LINES + [GOOD[:300], GOOD[:300]]), "duplicate_line_chars"),
    (" ".join(["buy cheap"] * 20 + GOOD.split()[:40]), "top_2_gram"),
    (" ".join(GOOD.split()[:60] + GOOD.split()[:12]), "duplicate_5_gram"),
])
def test_gopher_repetition_rules(text: str, rule: str) -> None:
    assert GopherRepetitionConfig()(text) == (False, rule)


def test_top_ngram_rules_for_n_3_and_4() -> None:
    # a repeated 3-gram repeats its 2-grams too: each rule alone, with Gopher's threshold
    three = " ".join(["we sell shoes"] * 12 + GOOD.split()[:60])
    assert GopherRepetitionConfig(top_ngram_fractions=((3, 0.18),))(three) == (False, "top_3_gram")
    four = " ".join(["best shoes in town"] * 9 + GOOD.split()[:80])
    assert GopherRepetitionConfig(top_ngram_fractions=((4, 0.16),))(four) == (False, "top_4_gram")
    assert GopherRepetitionConfig(top_ngram_fractions=((4, 0.5),), duplicate_ngram_fractions=())(four) == (True, "")


def test_duplicate_ngram_rules_for_each_n() -> None:
    words = GOOD.split()
    text = " ".join(words[:70] + words[:8])
    # the first rule checked wins; with 5..7 switched off the 8-gram one is the one that fires
    only = GopherRepetitionConfig(top_ngram_fractions=(), duplicate_ngram_fractions=((8, 0.05),))
    assert only(text) == (False, "duplicate_8_gram")
    assert GopherRepetitionConfig(top_ngram_fractions=(), duplicate_ngram_fractions=((9, 0.05),))(text) == (True, "")
    fractions = gopher.ngram_fractions(text.split(), top_ns=(), dup_ns=(5, 8, 9, 10))
    assert fractions[5] == fractions[8] > 0.05 and fractions[9] == fractions[10] == 0.0


@pytest.mark.parametrize("text, reason", [
    (GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    ("Home\nAbout us\nOne sentence only here.", "min_sentences"),
    ("menu\nlogin\nsearch", "no_lines_left"),
])
def test_c4_drops_documents(text: str, reason: str) -> None:
    assert C4Config()(text) == (None, reason)


def test_c4_removes_lines_and_curly_braces_are_optional() -> None:
    noisy = "\n".join(["Skip to content", GOOD.split("\n")[0], "Please enable JavaScript to view the comments.",
                       "This site uses cookies to improve your experience.", "Read more...",
                       "Short one.", GOOD.split("\n")[1] + " [1]", GOOD.split("\n")[2]])
    text, reason = C4Config()(noisy)
    assert reason == "" and text == "\n".join(GOOD.split("\n"))
    code = GOOD + "\nUse a dict such as {'a': 1} to count the words of the text."
    assert C4Config()(code)[1] == ""
    assert C4Config(drop_curly_brace=True)(code) == (None, "curly_brace")
    assert C4Config(remove_no_terminal_punct_lines=False, min_sentences=0)("a line without a stop")[0] is not None


@pytest.mark.parametrize("text, rule", [
    ("\n".join(["Our products for the garden and the house"] * 1 + [f"Category {i} of the shop and its offers" for i in range(9)]),
     "line_punct"),
    ("Price list.\nTea: 3 euro.\nCake: 4 euro.\nBread: 2 euro.\n" + GOOD.split("\n")[0], "short_lines"),
    (GOOD + "\n" + GOOD.split("\n")[0], "duplicate_line_chars"),
    ("\n".join(f"Item {i} is red." for i in range(20)) + "\n" + GOOD, "short_lines"),
])
def test_fineweb_rules(text: str, rule: str) -> None:
    assert FineWebConfig()(text) == (False, rule)


def test_fineweb_list_like() -> None:
    listy = "\n".join(f"The item number {i} in our catalogue is red." for i in range(6))
    assert FineWebConfig(max_short_line_fraction=1.0, max_newline_to_word_ratio=0.05)(listy) == (False, "list_like")
    assert FineWebConfig()(listy) == (True, "")


# --- language ------------------------------------------------------------------------------------

OTHER_LANGUAGES = {
    "de": "Der Zug nach München fährt heute wegen Bauarbeiten erst um halb neun vom Hauptbahnhof ab.",
    "fr": "Le marché du samedi matin attire des habitants de tous les villages voisins depuis des années.",
    "es": "Mi abuela preparaba la mejor tortilla de patatas del pueblo todos los domingos por la tarde.",
    "it": "La biblioteca comunale resterà chiusa per lavori di ristrutturazione fino alla fine di marzo.",
    "nl": "De fietsenmaker op de hoek heeft mijn band binnen tien minuten gerepareerd en niets gerekend.",
}


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"real data not present: {SHAKESPEARE}")
def test_language_identification_on_real_english_and_other_languages() -> None:
    text = SHAKESPEARE.read_text()
    paragraphs = [p for p in text.split("\n\n") if len(p) > 400][:200]
    english = [identify(p) for p in paragraphs]
    assert sum(lang == "en" and score > 0.5 for lang, score in english) >= 0.95 * len(paragraphs)
    cfg = LanguageConfig()
    for code, sentence in OTHER_LANGUAGES.items():
        lang, score = identify(sentence)
        assert lang == code and score > 0.9, (code, lang, score)
        assert cfg(sentence) == (False, "other_language")
        assert LanguageConfig(keep_languages=("en", code))(sentence) == (True, "")
    assert LanguageConfig(min_confidence=0.99)("What is 3 + 4?") == (False, "low_confidence")


# --- toxicity ------------------------------------------------------------------------------------


def test_wordlist_matches_whole_words_with_count_and_fraction_thresholds(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# a test list\nsmurf\nGrumpy\n")
    cfg = ToxicityConfig(wordlist=words, max_matches=3, max_match_fraction=0.05)
    assert cfg("Smurfs and smurfette are not whole-word hits. " * 3) == (True, "")
    assert cfg("One smurf in a short note.") == (False, "wordlist")  # 1 of 6 words > 5 %
    long_text = GOOD + " A smurf appears once. " + GOOD
    assert cfg(long_text) == (True, "")  # 1 of ~200 words
    assert cfg(long_text + " Smurf, SMURF!") == (False, "wordlist")  # 3 hits
    assert ToxicityConfig()(GOOD) == (True, "")
    with pytest.raises(ValueError, match="toxicity.wordlist"):
        ToxicityConfig(wordlist=tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT sequence classifier with a locally trained WordPiece tokenizer, saved like a Hub model."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("toxicity-classifier")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([GOOD] * 5 + list(OTHER_LANGUAGES.values()),
                            trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2, initializer_range=0.5,
                        id2label={0: "neutral", 1: "toxic"}, label2id={"neutral": 0, "toxic": 1})
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    return path


def test_classifier_loads_from_a_directory_and_scores_in_batches(tiny_classifier: Path) -> None:
    cfg = ToxicityConfig(classifier_dir=tiny_classifier, classifier_batch_size=2)
    texts = [GOOD, "zzq xkcd qqq wvv", GOOD[:80], "Der Zug"]
    scores = cfg.classifier_scores(texts)
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()
    one_by_one = [float(ToxicityConfig(classifier_dir=tiny_classifier, classifier_batch_size=1).classifier_scores([t])[0])
                  for t in texts]
    assert scores == pytest.approx(one_by_one, abs=1e-4)  # padding does not change a score
    assert scores.max() - scores.min() > 0.01  # the model is not constant on these inputs
    with pytest.raises(ValueError, match="classifier_label 'hate'.*neutral, toxic"):
        ToxicityConfig(classifier_dir=tiny_classifier, classifier_label="hate").classifier_scores(["x"])
    with pytest.raises(ValueError, match="toxicity.classifier_dir"):
        ToxicityConfig(classifier_dir=tiny_classifier / "nope")


# --- PII -----------------------------------------------------------------------------------------


def test_luhn() -> None:
    assert luhn_valid("4539 1488 0343 6467") and luhn_valid("5555-5555-5555-4444") and luhn_valid("378282246310005")
    assert not luhn_valid("4539 1488 0343 6468") and not luhn_valid("1234567812345678") and not luhn_valid("")


def test_pii_redacts_each_kind_and_counts_them() -> None:
    text = ("Write to jane.doe+news@mail.example.co.uk or j_smith@example.com. Call (415) 555-2671, "
            "555-867-5309 or +49 30 901820. Card 4539 1488 0343 6467, not 1234 5678 1234 5678. "
            "Server 93.184.216.34 and 2606:2800:220:1:248:1893:25c8:1946; localhost 127.0.0.1 stays. "
            "There were 18 flowers and 1,234,567 stars in 2024-03-15.")
    redacted, counts = PIIConfig()(text)
    assert counts == {"email": 2, "card_number": 1, "ip_address": 2, "phone": 3}
    assert "<EMAIL> or <EMAIL>." in redacted and "Call <PHONE>, <PHONE> or <PHONE>." in redacted
    assert "Card <CARD_NUMBER>, not 1234 5678 1234 5678." in redacted  # fails Luhn: kept
    assert "Server <IP_ADDRESS> and <IP_ADDRESS>;" in redacted and "127.0.0.1 stays" in redacted
    assert redacted.endswith("There were 18 flowers and 1,234,567 stars in 2024-03-15.")
    assert PIIConfig(redact_private_ips=True)("at 127.0.0.1")[0] == "at <IP_ADDRESS>"
    assert PIIConfig(emails=False, phones=False)("a@b.org (415) 555-2671")[1] == {}
