"""Tiny "foreign" base models, as a team would bring them from the Hugging Face Hub, built offline.

    path = build("qwen2", tmp_path / "qwen2")   # an HF directory: config, safetensors, tokenizer

Each is a 2-layer, hidden-64, 2-head model of its family's own class (LlamaForCausalLM,
Qwen2ForCausalLM, GPT2LMHeadModel, MistralForCausalLM) with a tokenizer that imitates the family's
conventions — the part that breaks code written for one house tokenizer:

| family  | bos                 | eos (base model)   | end of turn    | pad                 | template       | tied |
|---------|---------------------|--------------------|----------------|---------------------|----------------|------|
| llama   | <|begin_of_text|>   | <|end_of_text|>    | <|eot_id|>     | none (reserved ids) | Llama-3 header | no   |
| qwen2   | none (config: eod)  | <|endoftext|>      | <|im_end|>     | <|endoftext|>       | ChatML         | yes  |
| gpt2    | <|endoftext|>       | <|endoftext|>      | -              | none                | none           | yes  |
| mistral | <s>                 | </s>               | </s>           | none                | [INST]         | no   |

Llama and Mistral tokenizers add their bos through the post-processor (as the real ones do) and
their templates emit `{{ bos_token }}` too, so code that tokenizes a rendered chat with special
tokens on doubles the bos. Qwen2's model vocabulary is padded beyond the tokenizer (as Qwen's is),
so tokens added later may fit without a resize, and its bos lives only in the model config
(eod: <|endoftext|>), not in the tokenizer. The tokenizers are byte-level BPEs trained in a
fraction of a second on stdlib docstrings and arithmetic lines: no download anywhere.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

ARCHITECTURES = ("llama", "qwen2", "gpt2", "mistral")
MODEL_CLASS = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel,
               "mistral": MistralForCausalLM}
VOCAB_SIZE = 600
HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 64, 2, 2, 128, 256  # head_dim 32: servable by vLLM's CPU backend

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (  # Qwen2's: a default system message when the conversation brings none
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (  # no generation prompt: the prompt ends at [/INST]; the reply ends with eos
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant roles') }}{% endif %}{% endfor %}"
)

# special tokens in vocabulary order, and the tokenizer's named ones
FAMILY = {
    "llama": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                            "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"],
                  names=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
                  bos_processor="<|begin_of_text|>", template=LLAMA3_TEMPLATE, tied=False),
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  names=dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
                  bos_processor=None, template=CHATML_TEMPLATE, tied=True),
    "gpt2": dict(specials=["<|endoftext|>"],
                 names=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
                 bos_processor=None, template=None, tied=True),
    "mistral": dict(specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                    names=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
                    bos_processor="<s>", template=MISTRAL_TEMPLATE, tied=False),
}


def training_texts(max_chars: int = 40_000) -> list[str]:
    """Stdlib docstrings (parsed, never imported) and arithmetic lines: a few tens of KB of text."""
    texts, total = [], 0
    for name in ("textwrap", "string", "fractions", "statistics", "calendar", "heapq", "bisect", "shlex"):
        tree = ast.parse((Path(sysconfig.get_paths()["stdlib"]) / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and (doc := ast.get_docstring(node)):
                texts.append(doc)
                total += len(doc)
        if total >= max_chars:
            break
    rng = random.Random(0)
    for _ in range(400):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        texts.append(f"Sam has {a} apples and gets {b} more. <think>{a} + {b} = {a + b}</think> "
                     f"<answer>{a + b}</answer>")
    return texts


def build_tokenizer(arch: str, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the family's special tokens, post-processor and chat template."""
    family = FAMILY[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=family["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or training_texts(), trainer=trainer)
    if family["bos_processor"]:
        bos = family["bos_processor"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    # Every special token is registered as special, whether or not it has a named role.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family["specials"]])
    named = set(family["names"].values())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, **family["names"], model_max_length=POSITIONS,
        extra_special_tokens=[t for t in family["specials"] if t not in named],
        model_input_names=["input_ids", "attention_mask"])
    if family["template"]:
        fast.chat_template = family["template"]
    return fast


def model_config(arch: str, tokenizer: PreTrainedTokenizerFast):
    family = FAMILY[arch]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=family["tied"])
    if arch == "gpt2":
        return GPT2Config(vocab_size=len(tokenizer), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                          n_positions=POSITIONS, **ids)
    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                  max_position_embeddings=POSITIONS, **ids)
    if arch == "llama":
        return LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=1, **common)
    if arch == "qwen2":  # padded vocabulary, and a bos in the model config that the tokenizer lacks, as Qwen's
        common["bos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        return Qwen2Config(vocab_size=-(-len(tokenizer) // 128) * 128, num_key_value_heads=1, **common)
    return MistralConfig(vocab_size=len(tokenizer), num_key_value_heads=1, sliding_window=POSITIONS, **common)


def build_model(arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return MODEL_CLASS[arch](model_config(arch, tokenizer))


def build(arch: str, out_dir: Path, texts: list[str] | None = None, seed: int = 0) -> Path:
    """Save a fresh tiny `arch` model and its tokenizer into `out_dir` (save_pretrained) and return it."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    tokenizer = build_tokenizer(arch, texts)
    model = build_model(arch, tokenizer, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
