"""Bring your own base model: any Hugging Face causal-LM directory, made a policy every stage starts from.

    flywheel stage base_model source=/models/Qwen2.5-0.5B output_dir=/tmp/base

Most teams do not pretrain. This stage takes a Llama, Qwen2, GPT-2 or Mistral directory (anything
`AutoModelForCausalLM` loads) and writes `<output_dir>/final/`: the same architecture and format,
its own tokenizer and chat template, plus only what the alignment stages rely on:

- a chat template: the model's own when it has one, else ours (stages/tokenizer.py) with its role
  tokens added as special tokens;
- `eos_token` = the template's end-of-turn token, found by rendering a conversation. The stages
  append `eos_token_id` after every assistant reply, and generation stops at eos (and bos), so a
  base model whose eos is its document end (Llama-3's `<|end_of_text|>`, Qwen2's `<|endoftext|>`)
  would otherwise be taught to end turns with a token its template never writes;
- a bos (the document separator of pretraining replay and held-out perplexity) when the tokenizer
  has none: the model config's bos, as Qwen2's config names `<|endoftext|>`;
- a pad token distinct from eos (kept if the tokenizer has one, else an existing reserved token,
  else an added `<|pad|>`), and left padding for generation (training batches right-pad themselves);
- the reasoning markers `<think> </think> <answer> </answer>` as ordinary added tokens (single
  tokens that `decode(skip_special_tokens=True)` keeps, which the rewards read), unless
  `reasoning_tokens=false`;
- embedding rows for the tokens added, at the mean of the trained rows; tied weights stay tied.

`config.model_type` and the architecture class never change, so the checkpoints of every later
stage are still a Qwen2 (or GPT-2, ...) that vLLM and lm-evaluation-harness load as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from stages import checkpoint as ckpt
from stages.config import ConfigError, to_dict
from stages.tokenizer import CHAT_TEMPLATE, END_OF_TURN, PAD, REASONING_MARKERS, ROLES
from stages.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

STAGE = "base_model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# What a conversation is rendered with to find the template's end-of-turn token.
PROBE_QUESTION, PROBE_REPLY = "What is 2 + 3?", "5"


class BaseModelError(ConfigError):
    """The source directory cannot be a base model; the message names it and says why (a ConfigError:
    `flywheel` prints it as one line, not a traceback)."""


def refuse(source: Path, why: str) -> BaseModelError:
    return BaseModelError(f"base_model.source={source}: {why}")


@dataclass(frozen=True, kw_only=True)
class BaseModelConfig:
    source: Path  # a Hugging Face causal-LM directory (config.json, weights, tokenizer)
    output_dir: Path
    reasoning_tokens: bool = True  # add <think> </think> <answer> </answer> (the R1 recipe's format)
    lineage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not str(self.source):
            raise ValueError("base_model.source must name a Hugging Face model directory")


@dataclass(frozen=True)
class BaseModelResult:
    checkpoint: Path
    metrics: dict[str, float]


def check_source(source: Path) -> Any:
    """The source's config, or one BaseModelError naming the directory and what is wrong with it."""
    if not (source / "config.json").is_file():
        raise refuse(source, "not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        raise refuse(source, f"config.json does not load ({e})") from None
    # A reward model (…ForSequenceClassification) shares model_type with its LM: ask the saved class first.
    heads = config.architectures or []
    lm_heads = [a for a in heads if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if (heads and not lm_heads) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise refuse(source, f"not a causal language model (model_type {config.model_type!r}, architectures "
                             f"{heads}); base_model needs what AutoModelForCausalLM loads")
    if not any((source / f).is_file() for f in TOKENIZER_FILES):
        raise refuse(source, f"no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
                             "into the same directory (tokenizer.save_pretrained)")
    return config


def end_of_turn(tokenizer, source: Path) -> str:
    """The token the chat template writes right after an assistant reply (checked by rendering one)."""
    user = [{"role": "user", "content": PROBE_QUESTION}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": PROBE_REPLY}], tokenize=False)
    except Exception as e:  # jinja2 errors and the template's own raise_exception alike
        raise refuse(source, f"the chat template fails on a user/assistant conversation ({e})") from None
    # The stages train on prompt + reply + eos: the template must render that, in that order. Blanks
    # around the reply (Llama-2's "[/INST] reply </s>") are tolerated: the stages then differ from
    # the template by whitespace only.
    between = full[len(prompt):] if full.startswith(prompt) else ""
    if not between.lstrip().startswith(PROBE_REPLY):
        raise refuse(source, f"the chat template does not render the reply right after its generation prompt "
                             f"(prompt {prompt!r}, conversation {full!r})")
    tail = between.lstrip()[len(PROBE_REPLY):]
    after_reply = tail.lstrip()
    if between != PROBE_REPLY + after_reply:
        log.warning("base_model: %s's template puts blanks around the reply; the stages train without them", source)
    suffix = tokenizer(after_reply, add_special_tokens=False)["input_ids"]
    token = tokenizer.convert_ids_to_tokens(suffix[0]) if suffix else None
    if token not in tokenizer.get_added_vocab():
        raise refuse(source, f"the chat template ends an assistant turn with {after_reply!r}, not with a single "
                             "special token that could stop generation")
    return token


def choose_pad(tokenizer, template: str) -> str | None:
    """A pad token distinct from eos, or None when one must be added.

    A pad equal to eos is the classic bug: code that masks pad labels (HF collators, TRL) then masks
    every end of turn too, and the model never learns to stop. A pad equal to bos (Qwen2's
    <|endoftext|>) is kept: attention masks, not pad ids, say what is padding in every stage.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return tokenizer.pad_token
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    spare = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items())
             if t.special and t.content not in taken and t.content not in template
             and ("pad" in t.content.lower() or "reserved" in t.content.lower())]
    return min(spare, key=lambda t: "pad" not in t.lower()) if spare else None  # a pad-named one first


def add_reasoning_markers(tokenizer, source: Path) -> None:
    """Register the markers as non-special added tokens (new ids only for those the vocabulary lacks)."""
    have = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    special = [m for m in REASONING_MARKERS if have.get(m)]
    if special:
        raise refuse(source, f"{special} are special tokens there, so decode(skip_special_tokens=True) drops them "
                             "and no reward sees them; use reasoning_tokens=false or re-save them as normal tokens")
    # Markers the BPE already has as whole tokens become added tokens too (same id): never split in context.
    tokenizer.add_tokens([AddedToken(m, special=False, normalized=False) for m in REASONING_MARKERS if m not in have])


def init_new_rows(model, new_ids: list[int], trained_rows: int) -> None:
    """Set the embedding (and untied output) rows of `new_ids` to the mean of the first `trained_rows` rows.

    Why the mean: a new token's logit is then h·mean(E) = the mean of the old logits, so by Jensen
    exp(mean) <= mean(exp) each new token gets at most an average token's probability and the model's
    next-token distribution barely moves (Hewitt, "Initializing new word embeddings"). A random row
    can be anywhere, and rows past a padded vocabulary's used part (Qwen's) were never trained.
    """
    if not new_ids:
        return
    rows = torch.tensor(new_ids)
    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is None:
                continue
            weight = module.weight
            weight[rows] = weight[:trained_rows].float().mean(0).to(weight.dtype)
            if getattr(module, "bias", None) is not None:
                module.bias[rows] = module.bias[:trained_rows].float().mean().to(module.bias.dtype)


def prepare_tokenizer(tokenizer, source: Path, model_config: Any, reasoning_tokens: bool) -> dict[str, Any]:
    """Give `tokenizer` what the stages rely on (in place); returns what was changed, for meta.json."""
    before = set(tokenizer.get_vocab())
    added: dict[str, Any] = {}
    if tokenizer.chat_template:
        added["chat_template"] = "kept"
    else:
        tokenizer.add_special_tokens({"extra_special_tokens": [END_OF_TURN, *ROLES]},
                                     replace_extra_special_tokens=False)
        tokenizer.chat_template = CHAT_TEMPLATE
        added["chat_template"] = "ours"
    eot, document_end = end_of_turn(tokenizer, source), tokenizer.eos_token
    if eot != tokenizer.eos_token:
        added["eos_token"] = {"was": tokenizer.eos_token, "now": eot}
        tokenizer.eos_token = eot
    if tokenizer.bos_token is None:
        # The stages separate documents with bos (pretraining replay, held-out perplexity) and stop
        # generation at it. A tokenizer without one (Qwen2's) gets the model config's bos, else its
        # document end; encoding is unchanged, as no post-processor adds it.
        config_bos = getattr(model_config.get_text_config(), "bos_token_id", None)
        bos = tokenizer.convert_ids_to_tokens(config_bos) if config_bos is not None else document_end
        if bos is not None and bos != eot:
            tokenizer.bos_token = bos
            added["bos_token"] = bos
    pad = choose_pad(tokenizer, str(tokenizer.chat_template))
    if pad is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
        added["pad_token"] = PAD
    elif pad != tokenizer.pad_token:
        tokenizer.pad_token = pad
        added["pad_token"] = pad
    if reasoning_tokens:
        add_reasoning_markers(tokenizer, source)
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # save_pretrained writes init kwargs, not the attribute
    added["tokens"] = sorted((t for t in tokenizer.get_vocab() if t not in before), key=tokenizer.convert_tokens_to_ids)
    return added


def fit_embeddings(model, tokenizer, new_tokens: list[str], trained_rows: int) -> dict[str, Any]:
    """Rows for the added tokens (resizing only when they do not fit), tied weights still tied."""
    changed: dict[str, Any] = {}
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # never shrink: a padded vocabulary keeps its padding
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set below, deterministically
        changed["embedding_rows"] = {"was": rows, "now": len(tokenizer)}
    init_new_rows(model, tokenizer.convert_tokens_to_ids(new_tokens), min(trained_rows, rows))
    head = model.get_output_embeddings()
    if model.config.get_text_config().tie_word_embeddings and head is not None \
            and head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"{type(model).__name__}: resizing untied the output head from the embeddings")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
    return changed


def prepare(source: Path, output_dir: Path, *, reasoning_tokens: bool = True,
            lineage: dict | None = None, config: dict | None = None) -> Path:
    """Write `<output_dir>/final/`: `source` ready for every stage (see the module docstring); returns it.

    A finished directory from the same source and options is returned as it is (a retried task).
    """
    source, final = Path(source).resolve(), ckpt.final_dir(output_dir)
    if ckpt.is_complete(output_dir):
        meta = ckpt.read_meta(final)
        if (meta.get("source"), meta.get("reasoning_tokens")) != (str(source), reasoning_tokens):
            raise BaseModelError(f"base_model.output_dir: {final} was prepared from {meta.get('source')} "
                                 f"(reasoning_tokens={meta.get('reasoning_tokens')}), not {source}: use another "
                                 "output_dir")
        return final
    model_config = check_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        raise refuse(source, f"the tokenizer does not load ({e})") from None
    trained_rows = len(tokenizer)
    added = prepare_tokenizer(tokenizer, source, model_config, reasoning_tokens)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")  # a bf16 model stays bf16
    added |= fit_embeddings(model, tokenizer, added["tokens"], trained_rows)

    metrics = {"base_model/parameters": float(sum(p.numel() for p in model.parameters())),
               "base_model/vocab_size": float(len(tokenizer)), "base_model/added_tokens": float(len(added["tokens"]))}
    meta = {"stage": STAGE, "source": str(source), "reasoning_tokens": reasoning_tokens,
            "architecture": type(model).__name__, "model_type": model.config.model_type, "added": added,
            "config": config or {}, "lineage": lineage or {}, "parent": str(source), "metrics": metrics}
    return ckpt.save_checkpoint(final, model, tokenizer, meta)


def run(cfg: BaseModelConfig, tracker: Tracker | None = None) -> BaseModelResult:
    tracker = tracker or NullTracker()
    tracker.log_params({"stage": STAGE, **to_dict(cfg)})
    final = prepare(cfg.source, cfg.output_dir, reasoning_tokens=cfg.reasoning_tokens, lineage=cfg.lineage,
                    config=to_dict(cfg))
    metrics = ckpt.read_meta(final)["metrics"]
    tracker.log_metrics(metrics)
    return BaseModelResult(checkpoint=final, metrics=metrics)
