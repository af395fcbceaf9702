"""Train a byte-level BPE tokenizer on the cleaned dataset.

    flywheel stage tokenizer dataset=data/clean output_dir=/tmp/tok vocab_size=4096

Byte-level BPE never meets an unknown character. Chat roles are special tokens; the reasoning
markers `<think> </think> <answer> </answer>` are ordinary added tokens, so they are single tokens
yet survive `decode(skip_special_tokens=True)` and a serving stack's default detokenization.
The chat template is saved with the tokenizer (`chat_template.jinja`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from stages.dataset import atomic_dir, commit_dir, read_dataset
from stages.tracking import NullTracker, Tracker

DOC_SEPARATOR = "<|endoftext|>"  # bos, and the boundary between packed pretraining documents
PAD = "<|pad|>"
END_OF_TURN = "<|end|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
REASONING_MARKERS = ("<think>", "</think>", "<answer>", "</answer>")

# No BOS in the template: chat sequences begin with the first role token.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    dataset: Path
    output_dir: Path
    vocab_size: int = 4096
    min_frequency: int = 2
    max_chars: int = 0  # train on at most this many characters (0: all)

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size={self.vocab_size}: byte-level BPE needs at least 256 + specials")


@dataclass(frozen=True)
class TokenizerResult:
    tokenizer_dir: Path
    metrics: dict[str, float]


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `texts`, wrapped as a transformers fast tokenizer with the chat template."""
    specials = [DOC_SEPARATOR, PAD, END_OF_TURN, *ROLES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in REASONING_MARKERS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=DOC_SEPARATOR, eos_token=END_OF_TURN, pad_token=PAD,
        extra_special_tokens=list(ROLES), padding_side="left", model_max_length=1_000_000)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def run(cfg: TokenizerConfig, tracker: Tracker | None = None) -> TokenizerResult:
    tracker = tracker or NullTracker()
    texts = read_dataset(cfg.dataset)["text"].tolist()
    if cfg.max_chars:
        kept, total = [], 0
        for t in texts:
            if total >= cfg.max_chars:
                break
            kept.append(t)
            total += len(t)
        texts = kept
    tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency)

    sample = "\n".join(texts[:2000])
    chars_per_token = len(sample) / max(1, len(tokenizer(sample)["input_ids"]))
    metrics = {"tokenizer/vocab_size": float(len(tokenizer)), "tokenizer/chars_per_token": chars_per_token,
               "tokenizer/train_chars": float(sum(map(len, texts)))}

    out = Path(cfg.output_dir) / "tokenizer"
    tmp = atomic_dir(out)
    tokenizer.save_pretrained(tmp)
    commit_dir(tmp, out)
    tracker.log_metrics(metrics)
    return TokenizerResult(tokenizer_dir=out, metrics=metrics)
