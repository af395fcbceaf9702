"""Bring your own base model: a Llama, Qwen2, GPT-2 or Mistral directory, prepared once, carries every
alignment stage and stays its own architecture, with its own tokenizer and chat template.

The foreign models are tiny ones built from config (tests/stages/foreign.py). Both recipes' stages
(SFT, DPO, GRPO; reward model, PPO) run on qwen2 in the fast suite and on the other three families
under `slow`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          LlamaForSequenceClassification, LogitsProcessor, LogitsProcessorList)

from stages import base_model, dpo, grpo, ppo, reward, sft
from stages import checkpoint as ckpt
from stages.base_model import BaseModelConfig, BaseModelError, prepare
from stages.chat import prompt_and_response, prompt_ids, prompt_text
from stages.config import from_dict, parse_overrides
from stages.model import ModelConfig, build_model
from stages.rollout import pad_right, sample, token_logprobs
from stages.tokenize import separator_id
from stages.tokenizer import END_OF_TURN, PAD, REASONING_MARKERS, ROLES, train_tokenizer
from stages.tracking import RecordingTracker

from . import foreign
from .conftest import quiet_train

REASONED = "<think>2 + 3 = 5</think> <answer>5</answer>"
QUESTION = "What is 2 + 3?"
# What prepare must add to each family (tests/stages/foreign.py has the families' conventions).
EXPECTED = {
    "llama": dict(template="kept", eos="<|eot_id|>", eos_was="<|end_of_text|>", bos="<|begin_of_text|>",
                  pad="<|reserved_special_token_0|>", tokens=[*REASONING_MARKERS], rows=(600, 604)),
    "qwen2": dict(template="kept", eos="<|im_end|>", eos_was="<|endoftext|>", bos="<|endoftext|>",
                  pad="<|endoftext|>", tokens=[*REASONING_MARKERS], rows=(640, 640)),
    "gpt2": dict(template="ours", eos=END_OF_TURN, eos_was="<|endoftext|>", bos="<|endoftext|>", pad=PAD,
                 tokens=[END_OF_TURN, *ROLES, PAD, *REASONING_MARKERS], rows=(600, 609)),
    "mistral": dict(template="kept", eos="</s>", eos_was="</s>", bos="<s>", pad=PAD,
                    tokens=[PAD, *REASONING_MARKERS], rows=(600, 605)),
}
CHAIN_ARCHS = [pytest.param(a, marks=[] if a == "qwen2" else [pytest.mark.slow]) for a in foreign.ARCHITECTURES]


class Bases:
    """Each family's source directory and its prepared base, built on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def source(self, arch: str) -> Path:
        path = self.root / "source" / arch
        return path if path.exists() else foreign.build(arch, path)

    def prepared(self, arch: str) -> Path:
        out = self.root / "prepared" / arch
        return ckpt.final_dir(out) if ckpt.is_complete(out) else prepare(self.source(arch), out)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Bases:
    return Bases(tmp_path_factory.mktemp("bases"))


def render(tokenizer, reply: str | None = None) -> str:
    conversation = [{"role": "user", "content": QUESTION}]
    if reply is None:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(conversation + [{"role": "assistant", "content": reply}], tokenize=False)


# --- prepare ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", foreign.ARCHITECTURES)
def test_prepare_adds_what_each_family_lacks_and_keeps_its_architecture(bases: Bases, arch: str) -> None:
    want, final = EXPECTED[arch], bases.prepared(arch)
    meta = ckpt.read_meta(final)
    assert meta["stage"] == "base_model" and meta["source"] == str(bases.source(arch).resolve())
    assert meta["architecture"] == foreign.MODEL_CLASS[arch].__name__ and meta["model_type"] == arch
    assert meta["added"]["chat_template"] == want["template"] and meta["added"]["tokens"] == want["tokens"]
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == arch and config["architectures"] == [foreign.MODEL_CLASS[arch].__name__]
    assert config["vocab_size"] == want["rows"][1]
    source_tok, tok = AutoTokenizer.from_pretrained(bases.source(arch)), AutoTokenizer.from_pretrained(final)
    assert source_tok.eos_token == want["eos_was"] and tok.eos_token == want["eos"]
    assert (tok.bos_token, tok.pad_token, tok.padding_side) == (want["bos"], want["pad"], "left")
    assert tok.pad_token_id != tok.eos_token_id
    if want["template"] == "kept":
        assert tok.chat_template == source_tok.chat_template
    # The stages append eos after every reply; the template must write exactly that token there.
    assert render(tok, "5").startswith(render(tok) + "5" + tok.eos_token)
    assert tok.eos_token_id in json.loads((final / "generation_config.json").read_text())["eos_token_id"]


@pytest.mark.parametrize("arch", foreign.ARCHITECTURES)
def test_replayed_documents_are_separated_by_bos_never_by_the_end_of_turn(bases: Bases, arch: str) -> None:
    tok = AutoTokenizer.from_pretrained(bases.prepared(arch))
    assert separator_id(tok) == tok.convert_tokens_to_ids(EXPECTED[arch]["bos"]) != tok.eos_token_id


@pytest.mark.parametrize("arch", foreign.ARCHITECTURES)
def test_prepared_tokenizer_trains_on_the_templates_own_text_and_keeps_the_markers(bases: Bases, arch: str) -> None:
    tok = AutoTokenizer.from_pretrained(bases.prepared(arch))
    ids, mask = prompt_and_response(tok, QUESTION, REASONED)
    full = render(tok, REASONED)
    # Exactly the template's text through the end-of-turn token it writes after the reply.
    assert tok.decode(ids) == full[: full.index(REASONED) + len(REASONED) + len(tok.eos_token)]
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == REASONED + tok.eos_token
    # No doubled bos: Llama and Mistral templates write it, their post-processors would add it again.
    assert ids[:2].count(tok.bos_token_id) <= 1
    for marker in REASONING_MARKERS:
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1, marker
    assert tok.decode(tok(REASONED, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == REASONED


@pytest.mark.parametrize("arch", foreign.ARCHITECTURES)
def test_new_embedding_rows_are_the_mean_of_the_trained_ones_and_ties_hold(bases: Bases, arch: str) -> None:
    source, final = bases.source(arch), bases.prepared(arch)
    old, new = AutoModelForCausalLM.from_pretrained(source).eval(), AutoModelForCausalLM.from_pretrained(final).eval()
    assert type(new) is foreign.MODEL_CLASS[arch]
    trained = len(AutoTokenizer.from_pretrained(source))
    tok = AutoTokenizer.from_pretrained(final)
    added = tok.convert_tokens_to_ids(ckpt.read_meta(final)["added"]["tokens"])
    untouched = [i for i in range(new.get_input_embeddings().weight.shape[0]) if i not in added]
    for get in ("get_input_embeddings", "get_output_embeddings"):
        w_old, w_new = getattr(old, get)().weight, getattr(new, get)().weight
        assert torch.equal(w_new[[i for i in untouched if i < w_old.shape[0]]],
                           w_old[[i for i in untouched if i < w_old.shape[0]]])
        assert torch.allclose(w_new[added], w_old[:trained].mean(0).expand(len(added), -1))
    tied = arch in ("qwen2", "gpt2")
    assert (new.get_input_embeddings().weight.data_ptr() == new.get_output_embeddings().weight.data_ptr()) is tied
    assert ("lm_head.weight" in load_file(final / "model.safetensors")) is not tied
    # Old tokens' logits do not move, and a new token's logit is the mean of the old ones (linear head).
    ids = torch.tensor([tok(REASONED.replace("<", " "), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before, after = old(input_ids=ids).logits, new(input_ids=ids).logits
    assert torch.allclose(after[..., :trained], before[..., :trained], atol=1e-5)
    assert torch.allclose(after[..., added], before[..., :trained].mean(-1, keepdim=True).expand(-1, -1, len(added)),
                          atol=1e-5)


@pytest.mark.parametrize("arch", foreign.ARCHITECTURES)
def test_left_padded_rollouts_and_right_padded_logprobs_match_unpadded_ones(bases: Bases, arch: str) -> None:
    """GRPO samples left-padded batches and scores right-padded ones: padding must change nothing
    (GPT-2 learns absolute positions, the others rotate by position ids)."""
    final = bases.prepared(arch)
    tok, model = ckpt.load_tokenizer(final), ckpt.load_model(final).eval()
    questions = [QUESTION, "Sam has 12 apples and gets 7 more. How many apples does Sam have now?"]
    together = sample(model, tok, [prompt_text(tok, q) for q in questions], max_new_tokens=6, temperature=0)
    for i, q in enumerate(questions):
        assert together.completions[i] == sample(model, tok, [prompt_text(tok, q)], max_new_tokens=6,
                                                 temperature=0).completions[0]
        assert together.prompts[i] == prompt_ids(tok, q)
    seqs = [prompt_and_response(tok, q, REASONED)[0] for q in questions]
    ids, attn, _ = pad_right(seqs, tok.pad_token_id)
    with torch.no_grad():
        padded = token_logprobs(model, ids, attn)
        short = token_logprobs(model, ids[:1, : len(seqs[0])], attn[:1, : len(seqs[0])])
    assert len(seqs[0]) < ids.shape[1]
    assert torch.allclose(padded[0, : len(seqs[0]) - 1], short[0], atol=1e-5)


@pytest.mark.parametrize("arch", foreign.ARCHITECTURES)
def test_packed_sft_rows_see_each_example_alone(bases: Bases, arch: str) -> None:
    """SFT packing leaves the attention mask out and lets restarting position ids make it block-diagonal:
    every family's mask builder must read them so (GPT-2's included)."""
    final = bases.prepared(arch)
    tok, model = ckpt.load_tokenizer(final), ckpt.load_model(final).eval()
    a = prompt_and_response(tok, QUESTION, REASONED)
    b = prompt_and_response(tok, "Sam has 12 apples and gets 7 more.", "<answer>19</answer>")
    batch = sft.collate([[a, b]], tok.pad_token_id, len(a[0]) + len(b[0]) + 3)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids, _ in (a, b)]
    assert torch.allclose(packed[: len(a[0])], alone[0], atol=1e-4)
    assert torch.allclose(packed[len(a[0]): len(a[0]) + len(b[0])], alone[1], atol=1e-4)


def test_a_bf16_source_stays_bf16(tmp_path: Path) -> None:
    tok = foreign.build_tokenizer("llama")
    foreign.build_model("llama", tok).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    final = prepare(tmp_path / "bf16", tmp_path / "out")
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"


def test_our_own_checkpoint_passes_through_unchanged(tmp_path: Path) -> None:
    tok = train_tokenizer(foreign.training_texts(10_000), vocab_size=400)
    model = build_model(ModelConfig(max_seq_len=64), tok)
    model.save_pretrained(tmp_path / "ours")
    tok.save_pretrained(tmp_path / "ours")
    final = prepare(tmp_path / "ours", tmp_path / "out")
    assert ckpt.read_meta(final)["added"] == {"chat_template": "kept", "tokens": []}
    again = AutoTokenizer.from_pretrained(final)
    assert (again.eos_token, again.pad_token, again.bos_token) == (tok.eos_token, tok.pad_token, tok.bos_token)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(final).get_input_embeddings().weight,
                       model.get_input_embeddings().weight)


def test_without_reasoning_tokens_the_markers_stay_unregistered(bases: Bases, tmp_path: Path) -> None:
    final = prepare(bases.source("gpt2"), tmp_path / "plain", reasoning_tokens=False)
    assert ckpt.read_meta(final)["added"]["tokens"] == [END_OF_TURN, *ROLES, PAD]
    assert not set(REASONING_MARKERS) & set(AutoTokenizer.from_pretrained(final).get_added_vocab())


def test_a_finished_prepare_is_returned_as_is_and_another_source_is_refused(bases: Bases, tmp_path: Path) -> None:
    out = tmp_path / "base"
    final = prepare(bases.source("mistral"), out)
    written = (final / ckpt.META).read_text()
    assert prepare(bases.source("mistral"), out) == final and (final / ckpt.META).read_text() == written
    with pytest.raises(BaseModelError, match=f"prepared from {bases.source('mistral').resolve()}"):
        prepare(bases.source("llama"), out)


def test_a_directory_that_is_not_a_causal_lm_with_a_tokenizer_is_one_clear_error(bases: Bases, tmp_path: Path) -> None:
    tok = foreign.build_tokenizer("llama")
    reward_like = tmp_path / "reward_model"
    LlamaForSequenceClassification(foreign.model_config("llama", tok)).save_pretrained(reward_like)
    tok.save_pretrained(reward_like)
    no_tokenizer = tmp_path / "weights_only"
    foreign.build_model("llama", tok).save_pretrained(no_tokenizer)
    (tmp_path / "empty").mkdir()
    special_think = tmp_path / "special_think"
    foreign.build("llama", special_think)
    tok.add_special_tokens({"extra_special_tokens": ["<think>"]}, replace_extra_special_tokens=False)
    tok.save_pretrained(special_think)
    for path, why in [(reward_like, "not a causal language model.*LlamaForSequenceClassification"),
                      (no_tokenizer, "no tokenizer"), (tmp_path / "empty", "no config.json"),
                      (tmp_path / "missing", "no config.json"), (special_think, "special tokens there")]:
        with pytest.raises(BaseModelError, match=why) as err:
            prepare(path, tmp_path / "out" / path.name)
        assert str(path.resolve()) in str(err.value)
        assert not (tmp_path / "out" / path.name / "final").exists()


LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                   "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize(("template", "why"), [
    (LLAMA2_TEMPLATE, None),  # blanks around the reply: accepted, end of turn still </s>
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}assistant: {% endif %}", "not with a single special token"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}{{ raise_exception('no roles here') }}", "no roles here"),
    ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}",
     "does not render the reply"),
])
def test_the_end_of_turn_is_read_from_the_template_or_refused(tmp_path: Path, template: str, why: str | None) -> None:
    source = foreign.build("mistral", tmp_path / "src")
    tok = AutoTokenizer.from_pretrained(source)
    tok.chat_template = template
    tok.save_pretrained(source)
    if why is None:
        final = prepare(source, tmp_path / "out")
        assert AutoTokenizer.from_pretrained(final).eos_token == "</s>"
        return
    with pytest.raises(BaseModelError, match=why):
        prepare(source, tmp_path / "out")


def test_the_stage_runs_from_command_line_overrides(bases: Bases, tmp_path: Path) -> None:
    cfg = from_dict(BaseModelConfig, parse_overrides([f"source={bases.source('qwen2')}", f"output_dir={tmp_path}"]))
    # flows/cli.py picks a stage's config as the first *Config class the module defines.
    assert next(v for k, v in vars(base_model).items()
                if k.endswith("Config") and getattr(v, "__module__", None) == base_model.__name__) is BaseModelConfig
    tracker = RecordingTracker()
    result = base_model.run(cfg, tracker=tracker)
    assert result.checkpoint == tmp_path / "final" and ckpt.read_meta(result.checkpoint)["config"]["source"]
    assert result.metrics["base_model/added_tokens"] == 4.0 and tracker.params["stage"] == "base_model"
    assert tracker.series("base_model/vocab_size") == [604.0]


# --- every alignment stage from a prepared base ---------------------------------------------------


@dataclass
class Aligned:
    arch: str
    base: Path
    results: dict[str, object]  # stage -> its Result


class StopAfter(LogitsProcessor):
    """Bans the stop tokens for `n` new tokens, then forces eos: a run that stops there stopped at eos."""

    def __init__(self, start: int, n: int, eos: int, stops: list[int]) -> None:
        self.start, self.n, self.eos, self.stops = start, n, eos, stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        if input_ids.shape[1] - self.start < self.n:
            scores[:, self.stops] = -float("inf")
        else:
            scores[:] = -float("inf")
            scores[:, self.eos] = 0.0
        return scores


PARENT = {"sft": "base", "dpo": "sft", "grpo": "dpo", "reward": "sft", "ppo": "sft"}
POLICIES = ("sft", "dpo", "grpo", "ppo")  # the reward model is no causal LM


def family_class(arch: str, head: str = "causal") -> str:
    name = foreign.MODEL_CLASS[arch].__name__
    return name if head == "causal" else name.replace("LMHeadModel", "ForCausalLM").replace("ForCausalLM", head)


@pytest.fixture(scope="module", params=CHAIN_ARCHS)
def aligned(request: pytest.FixtureRequest, bases: Bases, corpus: Path, tmp_path_factory) -> Aligned:
    """Both recipes, a few steps per stage, from the prepared base of one family:
    SFT -> DPO -> GRPO (R1's), and SFT -> reward model -> PPO (InstructGPT's)."""
    arch, base = request.param, bases.prepared(request.param)
    out = tmp_path_factory.mktemp(f"aligned-{arch}")
    few = dict(max_steps=2, lr=1e-4, warmup_steps=0, checkpoint_every=2)
    r: dict[str, object] = {}
    r["sft"] = sft.run(sft.SFTConfig(dataset=corpus, policy=base, output_dir=out / "sft", batch_size=4,
                                     train=quiet_train(max_steps=3, lr=1e-3, warmup_steps=0)))
    r["dpo"] = dpo.run(dpo.DPOConfig(dataset=corpus, policy=r["sft"].checkpoint, output_dir=out / "dpo",
                                     batch_size=2, train=quiet_train(**few)))
    r["grpo"] = grpo.run(grpo.GRPOConfig(dataset=corpus, policy=r["dpo"].checkpoint, output_dir=out / "grpo",
                                         group_size=2, prompts_per_step=2, max_new_tokens=8, train=quiet_train(**few)))
    r["reward"] = reward.run(reward.RewardConfig(dataset=corpus, policy=r["sft"].checkpoint, output_dir=out / "reward",
                                                 batch_size=2, train=quiet_train(**few)))
    r["ppo"] = ppo.run(ppo.PPOConfig(dataset=corpus, policy=r["sft"].checkpoint, reward_model=r["reward"].checkpoint,
                                     reward="both", output_dir=out / "ppo", prompts_per_rollout=2, minibatches=1,
                                     ppo_epochs=1, max_new_tokens=6, train=quiet_train(**few)))
    return Aligned(arch, base, r)


def test_every_stage_keeps_the_family_format_and_its_ancestry(aligned: Aligned) -> None:
    base_tok = AutoTokenizer.from_pretrained(aligned.base)
    for stage, result in aligned.results.items():
        final = result.checkpoint
        assert all(v == v for v in result.metrics.values()), (stage, result.metrics)  # no NaN
        head = "ForSequenceClassification" if stage == "reward" else "causal"
        config = json.loads((final / "config.json").read_text())
        assert config["model_type"] == aligned.arch, stage
        assert config["architectures"] == [family_class(aligned.arch, head)], stage
        auto = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
        assert type(auto.from_pretrained(final)).__name__ == family_class(aligned.arch, head), stage
        tok = AutoTokenizer.from_pretrained(final)
        assert tok.get_vocab() == base_tok.get_vocab() and tok.chat_template == base_tok.chat_template, stage
        assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.padding_side) == \
            (base_tok.eos_token, base_tok.pad_token, base_tok.bos_token, "left"), stage
        meta = ckpt.read_meta(final)
        parent = aligned.base if PARENT[stage] == "base" else aligned.results[PARENT[stage]].checkpoint
        assert meta["stage"] == stage and meta["parent"] == str(parent), stage
    assert ckpt.read_meta(aligned.results["sft"].checkpoint)["parent_meta"]["stage"] == "base_model"
    value = AutoModelForSequenceClassification.from_pretrained(aligned.results["ppo"].value_model)
    assert type(value).__name__ == family_class(aligned.arch, "ForSequenceClassification")


def test_the_reward_model_reads_the_end_of_turn_token_whatever_the_padding(aligned: Aligned) -> None:
    model, tok = reward.load_reward_model(aligned.results["reward"].checkpoint)
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    short = prompt_and_response(tok, QUESTION, REASONED)[0]
    long = prompt_and_response(tok, QUESTION + " Think step by step, then answer.", REASONED + " " + REASONED)[0]
    alone = reward.score_ids(model, tok.pad_token_id, [short])
    padded = reward.score_ids(model, tok.pad_token_id, [short, long])
    assert alone[0] == pytest.approx(padded[0], abs=1e-5)
    # ... and it is the score head at the end-of-turn token, the last real one.
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([short])).last_hidden_state
    assert model.score(hidden)[0, -1, 0].item() == pytest.approx(alone[0], abs=1e-5)


def test_sft_from_the_base_reaches_the_added_marker_rows(aligned: Aligned) -> None:
    before = ckpt.load_model(aligned.base)
    after = ckpt.load_model(aligned.results["sft"].checkpoint)
    tok = ckpt.load_tokenizer(aligned.base)
    rows = tok.convert_tokens_to_ids(list(REASONING_MARKERS))
    for get in ("get_input_embeddings", "get_output_embeddings"):
        changed = (getattr(before, get)().weight[rows] != getattr(after, get)().weight[rows]).any(-1)
        assert changed.all(), (get, REASONING_MARKERS)


def test_aligned_checkpoints_generate_stop_at_the_end_of_turn_and_keep_the_markers(aligned: Aligned) -> None:
    for stage in POLICIES:
        final = aligned.results[stage].checkpoint
        model = AutoModelForCausalLM.from_pretrained(final).eval()
        tok = AutoTokenizer.from_pretrained(final)
        prompt = torch.tensor([prompt_ids(tok, QUESTION)])
        free = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5)
        assert free.shape[1] == prompt.shape[1] + 5 and int(free.max()) < len(tok), stage
        # The checkpoint's own generation config stops at the template's end-of-turn token.
        stops = model.generation_config.eos_token_id
        force = StopAfter(prompt.shape[1], 3, tok.eos_token_id, stops)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                             logits_processor=LogitsProcessorList([force]))
        assert out.shape[1] == prompt.shape[1] + 4 and int(out[0, -1]) == tok.eos_token_id, stage
        ids = tok(REASONED, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == REASONED, stage
        assert set(tok.convert_tokens_to_ids(list(REASONING_MARKERS))) <= set(ids), stage
