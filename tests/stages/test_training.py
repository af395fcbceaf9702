"""The training stages end to end on tiny models: they learn, they touch every weight, they save
checkpoints any Hugging Face reader loads, and a killed run resumes to the same weights.

The shared corpus, tokenizer, pretrained and SFT checkpoints come from tests/stages/conftest.py.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import checkpoint as ckpt
from stages import dpo, grpo, pretrain, sft
from stages.chat import load_problems, prompt_and_response, prompt_ids
from stages.config import PRESETS_DIR, ConfigError, from_dict, parse_overrides, to_dict
from stages.dpo import DPOConfig
from stages.grpo import GRPOConfig
from stages.model import ModelConfig, build_model
from stages.sft import SFTConfig
from stages.tasks.arithmetic import target
from stages.token_shards import ShardError, TokenShards
from stages.tracking import RecordingTracker
from stages.train_loop import TrainConfig, lr_at

from .conftest import LINEAGE, Trained, pretrain_config, quiet_train

HF_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", ckpt.META}


def assert_every_parameter_changed(before: torch.nn.Module, after: torch.nn.Module) -> None:
    """TRL's check: a parameter no gradient reached is a bug (frozen by mistake, detached, unused)."""
    after_params = dict(after.named_parameters())
    names = [n for n, p in before.named_parameters() if p.requires_grad]
    assert names and set(names) == {n for n, p in after_params.items() if p.requires_grad}
    unchanged = [n for n in names if torch.equal(dict(before.named_parameters())[n], after_params[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"


def head_tail_means(series: list[float], k: int) -> tuple[float, float]:
    assert len(series) >= 2 * k, series
    return sum(series[:k]) / k, sum(series[-k:]) / k


def assert_generates(checkpoint: Path, prompt: str = "Return the") -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5
    assert int(out.max()) < len(tok)


# --- pretraining -----------------------------------------------------------------------------


def test_pretrain_loss_is_finite_and_decreases_and_beats_unigram(pretrained: Trained) -> None:
    losses = pretrained.tracker.series("train/loss")
    assert len(losses) == pretrained.cfg.train.max_steps  # log_every=1
    assert all(math.isfinite(x) for x in losses)
    first, last = head_tail_means(losses, 5)
    assert last < first - 0.3, losses
    m = pretrained.result.metrics
    # Perplexity must beat the unigram floor on the same held-out tokens, or nothing was learned.
    assert 1 < m["eval/heldout/perplexity"] < m["eval/heldout/unigram_perplexity"]
    assert pretrained.tracker.params["stage"] == "pretrain" and pretrained.tracker.params["model/parameters"] > 0


def test_pretrain_changes_every_parameter(pretrained: Trained) -> None:
    cfg = pretrained.cfg
    initial = build_model(cfg.model, ckpt.load_tokenizer(cfg.tokenizer), seed=cfg.train.seed)
    assert_every_parameter_changed(initial, ckpt.load_model(pretrained.checkpoint))
    # Same seed, same initial weights: the comparison above is against the real starting point.
    again = build_model(cfg.model, ckpt.load_tokenizer(cfg.tokenizer), seed=cfg.train.seed)
    assert all(torch.equal(a, b) for a, b in zip(initial.parameters(), again.parameters(), strict=True))


def test_pretrain_checkpoint_contents(pretrained: Trained) -> None:
    final = pretrained.checkpoint
    assert final == pretrained.cfg.output_dir / "final"
    assert HF_FILES <= {p.name for p in final.iterdir()}
    assert not (final / ckpt.TRAINER_STATE).exists()  # the product carries no optimizer state
    meta = ckpt.read_meta(final)
    assert meta["stage"] == "pretrain" and meta["step"] == 30 and meta["parent"] is None
    # The config, and the held-out fraction the shards were cut with: evaluate finds the split by it.
    assert meta["config"] == {**to_dict(pretrained.cfg), "heldout_fraction": 0.02}
    assert meta["lineage"] == LINEAGE
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", meta["git_commit"])
    assert {"train/loss", "eval/heldout/perplexity"} <= set(meta["metrics"])
    assert meta["metrics"]["train/loss"] == pretrained.tracker.series("train/loss")[-1]
    # keep_checkpoints=2 of steps 10, 20, 30; each resumable with the HF files plus trainer state.
    steps = sorted(p.name for p in (pretrained.cfg.output_dir / "checkpoints").iterdir())
    assert steps == ["step-000020", "step-000030"]
    for name in steps:
        assert HF_FILES | {ckpt.TRAINER_STATE} <= {p.name for p in (final.parent / "checkpoints" / name).iterdir()}
    gen = json.loads((final / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(final)
    assert set(gen["eos_token_id"]) == {tok.convert_tokens_to_ids("<|end|>"), tok.bos_token_id}


def test_pretrain_checkpoint_reloads_and_generates(pretrained: Trained) -> None:
    assert_generates(pretrained.checkpoint)
    tok = AutoTokenizer.from_pretrained(pretrained.checkpoint)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>hi<|end|><|assistant|>"


class Killed(RuntimeError):
    """Stands in for SIGKILL: the run stops mid-flight, nothing gets to clean up."""


class KillAtStep(RecordingTracker):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.kill_step = step

    def log_metrics(self, metrics, step=None) -> None:
        if step == self.kill_step:
            raise Killed(f"killed at step {step}")
        super().log_metrics(metrics, step)


def test_pretrain_resume_matches_uninterrupted_run(tokens: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    train = {"max_steps": 6, "checkpoint_every": 3}
    straight = RecordingTracker()
    pretrain.run(pretrain_config(tokens, tokenizer_dir, tmp_path / "a", **train), tracker=straight)

    # Same config (so the same LR schedule), killed after the step-3 checkpoint, then run again.
    cfg = pretrain_config(tokens, tokenizer_dir, tmp_path / "b", **train)
    with pytest.raises(Killed):
        pretrain.run(cfg, tracker=KillAtStep(5))
    assert ckpt.latest_checkpoint(tmp_path / "b") == ckpt.step_dir(tmp_path / "b", 3)
    assert not ckpt.is_complete(tmp_path / "b")
    resumed = RecordingTracker()
    pretrain.run(cfg, tracker=resumed)

    steps = [s for s, m in resumed.metrics if "train/loss" in m]
    assert steps == [4, 5, 6]  # continued where the checkpoint left off, did not start over
    assert resumed.series("train/loss") == straight.series("train/loss")[3:]
    a = ckpt.load_model(tmp_path / "a" / "final").state_dict()
    b = ckpt.load_model(tmp_path / "b" / "final").state_dict()
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, f"resumed weights differ from the uninterrupted run: {mismatched}"


def test_pretrain_reads_the_token_shards(pretrained: Trained) -> None:
    cfg = pretrained.cfg
    train_split, heldout = TokenShards(cfg.tokens, "train"), TokenShards(cfg.tokens, "heldout")
    # The batches are the shards' packed windows: a step's inputs are rows of the training stream.
    batch = pretrain.shard_batch(train_split, 7, cfg.seq_len, cfg.batch_size, cfg.train.seed)
    windows = train_split.window_indices(7, cfg.seq_len, cfg.batch_size, cfg.train.seed)
    for row, w in zip(batch["input_ids"], windows, strict=True):
        assert torch.equal(row, torch.from_numpy(train_split.read(w * cfg.seq_len, (w + 1) * cfg.seq_len)))
    assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])

    # Held-out perplexity is the final model's on the held-out shards' first windows, not the training split's.
    model = ckpt.load_model(pretrained.checkpoint).eval()
    n = cfg.eval_windows * cfg.seq_len + 1
    with torch.no_grad():
        on_heldout = pretrain.heldout_perplexity(model, heldout.read(0, n), cfg.seq_len, cfg.eval_windows)
        on_train = pretrain.heldout_perplexity(model, train_split.read(0, n), cfg.seq_len, cfg.eval_windows)
    m = pretrained.result.metrics
    assert m["eval/heldout/perplexity"] == pytest.approx(on_heldout, rel=1e-4)
    assert on_train != pytest.approx(on_heldout, rel=1e-3)
    # The unigram floor: the training split's counts, scored on every held-out token.
    held = np.bincount(heldout.read(0, len(heldout)), minlength=train_split.vocab_size)
    assert m["eval/heldout/unigram_perplexity"] == pytest.approx(
        pretrain.unigram_perplexity(np.bincount(train_split.read(0, len(train_split)), minlength=len(held)), held))
    assert pretrained.tracker.params["data/train_tokens"] == len(train_split) > 0 < len(heldout)


def test_pretrain_on_a_truncated_shard_names_the_file(tokens: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tokens, tmp_path / "tokens"))
    shard = copy / json.loads((copy / "index.json").read_text())["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-6])  # three uint16 tokens short
    with pytest.raises(ShardError, match=rf"{re.escape(str(shard))}: truncated"):
        pretrain.run(pretrain_config(copy, tokenizer_dir, tmp_path / "out"))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_pretrain_refuses_shards_of_another_tokenizer(tokens: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tokens, tmp_path / "tokens"))
    index = json.loads((copy / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps({**index, "tokenizer_hash": "0" * 32}))
    with pytest.raises(ValueError, match="tokenized by another tokenizer"):
        pretrain.run(pretrain_config(copy, tokenizer_dir, tmp_path / "out"))


def test_latest_checkpoint_ignores_half_written_directories(pretrained: Trained, tmp_path: Path) -> None:
    shutil.copytree(pretrained.cfg.output_dir / "checkpoints", tmp_path / "checkpoints")
    newest = ckpt.step_dir(tmp_path, 30)
    assert ckpt.latest_checkpoint(tmp_path) == newest
    # A save killed before its rename leaves `.tmp-step-...` behind, trainer state and all.
    shutil.copytree(newest, tmp_path / "checkpoints" / ".tmp-step-000040-12345")
    # A directory with the right name but no trainer state is not resumable either.
    partial = ckpt.step_dir(tmp_path, 50)
    shutil.copytree(newest, partial)
    (partial / ckpt.TRAINER_STATE).unlink()
    assert ckpt.latest_checkpoint(tmp_path) == newest
    assert ckpt.latest_checkpoint(tmp_path / "nothing-here") is None


def test_lr_schedule_warms_up_then_decays_to_floor() -> None:
    cfg = TrainConfig(max_steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# --- SFT -------------------------------------------------------------------------------------


def test_sft_loss_decreases_and_records_its_parent(sft_trained: Trained, pretrained: Trained) -> None:
    losses = sft_trained.tracker.series("train/loss")
    assert all(math.isfinite(x) for x in losses)
    first, last = head_tail_means(losses, 3)
    assert last < first - 1.0, losses
    meta = ckpt.read_meta(sft_trained.checkpoint)
    assert meta["stage"] == "sft" and meta["parent"] == str(pretrained.checkpoint)
    assert meta["parent_meta"]["stage"] == "pretrain" and meta["parent_meta"]["lineage"] == LINEAGE
    assert HF_FILES <= {p.name for p in sft_trained.checkpoint.iterdir()}


def test_prompt_and_response_mask_covers_the_answer_only(pretrained: Trained) -> None:
    tok = ckpt.load_tokenizer(pretrained.checkpoint)
    question, answer = "Ann has 3 apples. She gets 4 more. How many?", "<think>3 + 4 = 7</think> <answer>7</answer>"
    ids, mask = prompt_and_response(tok, question, answer)
    prompt = prompt_ids(tok, question)
    assert len(ids) == len(mask) and ids[: len(prompt)] == prompt
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert prompt[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == answer + "<|end|>"


def record_sft_batches(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Every batch SFT's loss sees, copied: to check what the stage actually trains on."""
    seen: list[dict[str, torch.Tensor]] = []

    def spy(model, batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        return pretrain.lm_loss(model, batch)

    monkeypatch.setattr(sft, "lm_loss", spy)
    return seen


def test_sft_batches_put_loss_on_assistant_tokens_only(corpus: Path, pretrained: Trained, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_sft_batches(monkeypatch)
    sft.run(SFTConfig(dataset=corpus, policy=pretrained.checkpoint, output_dir=tmp_path, batch_size=6,
                      train=quiet_train(max_steps=1, warmup_steps=1)))
    tok = ckpt.load_tokenizer(pretrained.checkpoint)
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    targets = {target(p) for p in load_problems(corpus, "train")}
    (batch,) = seen
    assert batch["input_ids"].shape[0] == 6
    for ids, labels, attn in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        supervised = (labels != -100).nonzero().flatten().tolist()
        start, stop = supervised[0], supervised[-1] + 1
        assert supervised == list(range(start, stop))  # one contiguous span: the assistant's turn
        assert ids[start - 1] == assistant
        assert ids[stop - 1] == tok.eos_token_id and attn[stop:].sum() == 0 and attn[:stop].all()
        assert torch.equal(labels[start:stop], ids[start:stop])
        assert tok.decode(ids[start : stop - 1]) in targets



def test_sft_replay_rows_are_corpus_windows_with_loss_on_every_token(corpus: Path, tokens: Path, pretrained: Trained,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_sft_batches(monkeypatch)
    sft.run(SFTConfig(dataset=corpus, tokens=tokens, policy=pretrained.checkpoint, output_dir=tmp_path, batch_size=8,
                      replay_fraction=0.25, replay_seq_len=16, train=quiet_train(max_steps=1, warmup_steps=1)))
    (batch,) = seen
    tok = ckpt.load_tokenizer(pretrained.checkpoint)
    chat_rows, replay_rows = batch["input_ids"][:6], batch["input_ids"][6:]
    assert all(tok.convert_tokens_to_ids("<|assistant|>") in row.tolist() for row in chat_rows)
    for row, labels, attn in zip(replay_rows, batch["labels"][6:], batch["attention_mask"][6:], strict=True):
        assert attn[:16].all() and not attn[16:].any()  # a 16-token window of pretraining text
        assert torch.equal(labels[:16], row[:16])  # supervised everywhere, unlike a chat row
    with pytest.raises(ValueError, match="replay_fraction"):
        SFTConfig(dataset=corpus, policy=tmp_path, output_dir=tmp_path, replay_fraction=1.0)


def test_dpo_nll_weight_adds_the_chosen_answers_nll(corpus: Path, sft_trained: Trained, tmp_path: Path) -> None:
    # At the first step the policy equals the reference: the DPO part is exactly log 2, so the rest
    # of the loss is the weighted mean per-token NLL of the chosen answers, which is positive.
    runs = {}
    for weight in (0.0, 1.0):
        tracker = RecordingTracker()
        dpo.run(DPOConfig(policy=sft_trained.checkpoint, dataset=corpus, output_dir=tmp_path / str(weight),
                          batch_size=4, nll_weight=weight, train=quiet_train(max_steps=1, warmup_steps=1)), tracker)
        runs[weight] = tracker.series("train/loss")[0]
    assert runs[0.0] == pytest.approx(math.log(2), abs=1e-4)
    assert runs[1.0] > runs[0.0] + 0.01


# --- DPO -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_trained(corpus: Path, sft_trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    cfg = DPOConfig(policy=sft_trained.checkpoint, dataset=corpus, output_dir=tmp_path_factory.mktemp("dpo"),
                    batch_size=8, beta=0.1, lineage=LINEAGE,
                    train=quiet_train(max_steps=8, lr=1e-3, warmup_steps=1, checkpoint_every=8))
    tracker = RecordingTracker()
    return Trained(cfg, dpo.run(cfg, tracker=tracker), tracker)


def test_dpo_starts_at_log2_and_learns_the_preference(dpo_trained: Trained) -> None:
    losses = dpo_trained.tracker.series("train/loss")
    accuracy = dpo_trained.tracker.series("dpo/accuracy")
    margins = dpo_trained.tracker.series("dpo/reward_margin")
    # Step 1: the policy *is* the reference, so every implicit reward is 0 and the loss is log 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert accuracy[0] == 0.0 and margins[0] == pytest.approx(0.0, abs=1e-4)
    assert all(math.isfinite(x) for x in losses + margins)
    assert sum(losses[-3:]) / 3 < math.log(2) - 0.05, losses
    assert sum(accuracy[-3:]) / 3 > 0.5, accuracy
    assert margins[-1] > 0


def test_dpo_changes_every_parameter_and_saves_a_loadable_checkpoint(dpo_trained: Trained,
                                                                     sft_trained: Trained) -> None:
    assert_every_parameter_changed(ckpt.load_model(sft_trained.checkpoint), ckpt.load_model(dpo_trained.checkpoint))
    meta = ckpt.read_meta(dpo_trained.checkpoint)
    assert meta["stage"] == "dpo" and meta["parent"] == str(sft_trained.checkpoint)
    assert meta["parent_meta"]["stage"] == "sft"
    assert_generates(dpo_trained.checkpoint)


# --- GRPO ------------------------------------------------------------------------------------


def test_grpo_updates_the_policy_with_finite_rl_metrics(corpus: Path, sft_trained: Trained, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A 20-step SFT model never earns the arithmetic reward, so every group would score all zeros,
    # every advantage would be 0 and (correctly) nothing would move. Reward completion length
    # instead: it varies within each group, which is all the update machinery needs.
    def by_length(completions, *, answers, **_):
        assert len(completions) == len(answers)
        return [len(c) / 10 for c in completions]

    monkeypatch.setattr(grpo, "combined", by_length)
    cfg = GRPOConfig(dataset=corpus, policy=sft_trained.checkpoint, output_dir=tmp_path, group_size=4,
                     prompts_per_step=2, max_new_tokens=12, updates_per_rollout=2, lineage=LINEAGE,
                     train=quiet_train(max_steps=3, lr=1e-3, warmup_steps=0, checkpoint_every=2))
    tracker = RecordingTracker()
    result = grpo.run(cfg, tracker=tracker)

    for name in ("rl/kl", "rl/reward_mean", "rl/accuracy", "rl/clip_fraction", "train/loss"):
        series = tracker.series(name)
        assert len(series) == 3 and all(math.isfinite(x) for x in series), (name, series)
    kl = tracker.series("rl/kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # first update: policy == reference
    assert kl[1] > 0  # after one step the policy has left the reference
    assert tracker.series("rl/reward_mean")[0] > 0
    assert_every_parameter_changed(ckpt.load_model(sft_trained.checkpoint), ckpt.load_model(result.checkpoint))
    assert ckpt.read_meta(result.checkpoint)["stage"] == "grpo"
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 3)
    assert_generates(result.checkpoint)


# --- configuration ---------------------------------------------------------------------------


def test_from_dict_names_the_typo_and_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key max_step\b") as e:
        from_dict(TrainConfig, {"max_step": 5})
    assert "max_steps" in str(e.value) and "log_every" in str(e.value)
    with pytest.raises(ConfigError, match=r"train\.lrr .*valid keys of train: .*\blr\b"):
        from_dict(SFTConfig, {"dataset": "d", "policy": "p", "output_dir": "o", "train": {"lrr": 1e-3}})
    with pytest.raises(ConfigError, match="max_steps"):
        from_dict(TrainConfig, {"max_steps": "ten"})


def test_from_dict_builds_typed_nested_configs() -> None:
    cfg = from_dict(SFTConfig, {"dataset": "d", "policy": "p", "output_dir": "o", "train": {"lr": 1, "max_steps": 7}})
    assert cfg.dataset == Path("d") and isinstance(cfg.train, TrainConfig)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.max_steps == 7
    assert cfg.train.warmup_steps == TrainConfig().warmup_steps  # untouched fields keep their defaults


def test_parse_overrides_nests_keys_and_parses_numbers() -> None:
    got = parse_overrides(["train.lr=3e-4", "train.max_steps=10", "model.hidden_size=64", "seed=1",
                           "promote.model_name=chat-v2", "train.progress=false", "a.b.c=0.5"])
    assert got == {"train": {"lr": 0.0003, "max_steps": 10, "progress": False}, "model": {"hidden_size": 64},
                   "seed": 1, "promote": {"model_name": "chat-v2"}, "a": {"b": {"c": 0.5}}}
    assert isinstance(got["train"]["lr"], float) and isinstance(got["train"]["max_steps"], int)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])
    # Text that is not YAML stays text: a cron line starts like a YAML alias.
    assert parse_overrides(["schedule.retrain_cron=*/30 * * * *"]) == {"schedule": {"retrain_cron": "*/30 * * * *"}}


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_shipped_preset_loads(preset: str) -> None:
    from flows.lifecycle_config import SECTIONS, LifecycleConfig

    cfg = LifecycleConfig.load(preset)
    assert set(cfg.sections) <= set(SECTIONS)
    model = cfg.build("model")
    assert model.hidden_size // model.num_heads >= 32  # servable by vLLM's CPU backend
    pre = cfg.build("pretrain", tokens=Path("d"), tokenizer=Path("t"), output_dir=Path("o"))
    assert pre.model == model and pre.seq_len <= model.max_seq_len


def test_lifecycle_config_rejects_typos_and_wiring_keys() -> None:
    from flows.lifecycle_config import LifecycleConfig

    assert LifecycleConfig.load("tiny", ["pretrain.train.lr=3e-4"]).build(
        "pretrain", tokens=Path("d"), tokenizer=Path("t"), output_dir=Path("o")).train.lr == 3e-4
    with pytest.raises(ConfigError, match=r"pretrain\.sequence_len .*seq_len"):
        LifecycleConfig.load("tiny", ["pretrain.sequence_len=64"])
    with pytest.raises(ConfigError, match=r"sft\.policy is set by the lifecycle"):
        LifecycleConfig.load("tiny", ["sft.policy=/somewhere"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        LifecycleConfig.load("nope")
    # A global batch smaller than the world leaves a rank without rows (it would hang in all-reduce).
    with pytest.raises(ConfigError, match=r"pretrain\.batch_size=1 is smaller than ray\.num_workers=2"):
        LifecycleConfig.load("tiny", ["pretrain.batch_size=1", "ray.num_workers=2"])
    assert LifecycleConfig.load("tiny", ["pretrain.batch_size=1", "ray.num_workers=1"])


def test_model_config_refuses_head_dim_below_32() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=1)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(hidden_size=128, num_heads=4, num_kv_heads=3)
    assert ModelConfig(hidden_size=64, num_heads=2, num_kv_heads=1).hidden_size == 64


def test_grpo_refuses_checkpoints_inside_a_reused_rollout(tmp_path: Path) -> None:
    # A rollout is kept in memory only: a checkpoint mid-rollout could not be resumed exactly.
    with pytest.raises(ValueError, match="multiple of updates_per_rollout"):
        GRPOConfig(dataset=tmp_path, policy=tmp_path, output_dir=tmp_path, updates_per_rollout=2,
                   train=quiet_train(max_steps=4, checkpoint_every=3))
