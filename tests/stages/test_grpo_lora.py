"""LoRA in GRPO and DPO: only the adapter trains, the reference is the base (the adapter switched off,
no frozen copy), the product is a merged plain checkpoint with the adapter beside it, resume is exact;
and a rollout server without an adapter to hot-load is refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stages import checkpoint as ckpt
from stages import dpo, grpo
from stages.dpo import DPOConfig
from stages.grpo import GRPOConfig
from stages.lora import LoraConfig
from stages.rollout import token_logprobs
from stages.tracking import RecordingTracker

from .conftest import LINEAGE, Trained, quiet_train
from .test_lora import KillAtStep, Killed

SMALL = LoraConfig(r=4, alpha=8)


def by_length(completions, *, answers, **_):
    """A reward that varies within every group (the tiny SFT model never earns the arithmetic one)."""
    return [len(c) / 10 for c in completions]


def grpo_config(corpus: Path, policy: Path, output_dir: Path, **overrides) -> GRPOConfig:
    return GRPOConfig(**{"dataset": corpus, "policy": policy, "output_dir": output_dir, "group_size": 4,
                         "prompts_per_step": 2, "max_new_tokens": 10, "lora": SMALL, "lineage": LINEAGE,
                         "train": quiet_train(max_steps=3, lr=1e-2, warmup_steps=0, checkpoint_every=1),
                         **overrides})


def dpo_config(corpus: Path, policy: Path, output_dir: Path) -> DPOConfig:
    return DPOConfig(policy=policy, dataset=corpus, output_dir=output_dir, batch_size=4, lora=SMALL,
                     lineage=LINEAGE, train=quiet_train(max_steps=4, lr=1e-2, warmup_steps=0, checkpoint_every=2))


def no_grad_calls(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[tuple]:
    """Record (args, result) of every gradient-free call of `module.name`: the reference passes."""
    real, seen = getattr(module, name), []

    def spy(m, *args, **kwargs):
        out = real(m, *args, **kwargs)
        if not torch.is_grad_enabled():
            seen.append((m, [a.detach().clone() for a in args], kwargs, out.detach().clone()))
        return out

    monkeypatch.setattr(module, name, spy)
    return seen


def assert_only_adapter_layers_changed(base_dir: Path, final: Path) -> None:
    """The merged checkpoint differs from its parent exactly in the adapted layers (q_proj, v_proj)."""
    base, tuned = load_file(base_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    adapted = {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert changed == adapted, f"changed {sorted(changed ^ adapted)} beyond/short of the adapted layers"
    adapter = load_file(final / ckpt.ADAPTER / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter) and len(adapter) == 8
    assert all(adapter[k].abs().sum() > 0 for k in adapter if ".lora_B." in k)  # B left zero: it trained


def assert_plain_checkpoint_with_adapter(final: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(final)  # plain HF, no peft wrapper needed
    assert not hasattr(model, "peft_config")
    assert not any("lora" in k for k in model.state_dict())
    assert (final / ckpt.ADAPTER / "adapter_config.json").is_file()
    assert ckpt.read_meta(final)["adapter"] == ckpt.ADAPTER


# --- GRPO -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_lora(corpus: Path, sft_trained: Trained, tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    mp.setattr(grpo, "combined", by_length)
    refs = no_grad_calls(mp, grpo, "token_logprobs")
    try:
        cfg = grpo_config(corpus, sft_trained.checkpoint, tmp_path_factory.mktemp("grpo-lora"))
        tracker = RecordingTracker()
        result = grpo.run(cfg, tracker=tracker)
    finally:
        mp.undo()
    return Trained(cfg, result, tracker), refs


def test_grpo_lora_trains_only_the_adapter_and_saves_merged(grpo_lora, sft_trained: Trained) -> None:
    trained, _ = grpo_lora
    assert_only_adapter_layers_changed(sft_trained.checkpoint, trained.checkpoint)
    assert_plain_checkpoint_with_adapter(trained.checkpoint)
    kl = trained.tracker.series("rl/kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0  # the adapter moved away from the base


def test_grpo_lora_reference_is_the_base_model(grpo_lora, sft_trained: Trained) -> None:
    _, refs = grpo_lora
    assert len(refs) == 3  # one reference pass per rollout, none a frozen copy's
    base = ckpt.load_model(sft_trained.checkpoint).eval()
    model, (ids, attn), kwargs, ref = refs[-1]  # the last rollout: the adapter has had two updates
    with torch.no_grad():
        expected = token_logprobs(base, ids, attn, **kwargs)
        adapted = token_logprobs(model, ids, attn, **kwargs)  # the trained policy, adapter on
    assert torch.allclose(ref, expected, atol=1e-5), (ref - expected).abs().max()
    assert not torch.allclose(adapted, expected, atol=1e-3)  # the policy itself has moved: the check can fail


# --- DPO --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_lora(corpus: Path, sft_trained: Trained, tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    refs = no_grad_calls(mp, dpo, "summed_logprobs")
    try:
        cfg = dpo_config(corpus, sft_trained.checkpoint, tmp_path_factory.mktemp("dpo-lora"))
        tracker = RecordingTracker()
        result = dpo.run(cfg, tracker=tracker)
    finally:
        mp.undo()
    return Trained(cfg, result, tracker), refs


def test_dpo_lora_trains_only_the_adapter_and_saves_merged(dpo_lora, sft_trained: Trained) -> None:
    trained, refs = dpo_lora
    assert_only_adapter_layers_changed(sft_trained.checkpoint, trained.checkpoint)
    assert_plain_checkpoint_with_adapter(trained.checkpoint)
    losses = trained.tracker.series("train/loss")
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at the start


def test_dpo_lora_reference_is_the_base_model(dpo_lora, sft_trained: Trained) -> None:
    _, refs = dpo_lora
    assert len(refs) == 2 * 4  # chosen and rejected per step
    base = ckpt.load_model(sft_trained.checkpoint).eval()
    model, (ids, attn, mask), _, ref = refs[-1]
    with torch.no_grad():
        expected = dpo.summed_logprobs(base, ids, attn, mask)
        adapted = dpo.summed_logprobs(model, ids, attn, mask)
    assert torch.allclose(ref, expected, atol=1e-4), (ref - expected).abs().max()
    assert not torch.allclose(adapted, expected, atol=1e-2)


def test_dpo_lora_resume_matches_an_uninterrupted_run(dpo_lora, corpus: Path, sft_trained: Trained,
                                                      tmp_path: Path) -> None:
    trained, _ = dpo_lora
    cfg = dpo_config(corpus, sft_trained.checkpoint, tmp_path)
    with pytest.raises(Killed):
        dpo.run(cfg, tracker=KillAtStep(3))
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 2) and not ckpt.is_complete(tmp_path)
    resumed = RecordingTracker()
    dpo.run(cfg, tracker=resumed)
    assert resumed.series("train/loss") == trained.tracker.series("train/loss")[2:]
    for name in (ckpt.ADAPTER + "/adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(trained.checkpoint / name), load_file(ckpt.final_dir(tmp_path) / name)
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and not differ, f"{name}: resumed weights differ: {differ}"


# --- configuration ----------------------------------------------------------------------------


def test_rollout_server_without_lora_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"grpo\.rollout_url needs grpo\.lora\.r > 0.*weight-transfer.*restart"):
        GRPOConfig(dataset=tmp_path, policy=tmp_path, output_dir=tmp_path, rollout_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"grpo\.rollout_url must be an http"):
        GRPOConfig(dataset=tmp_path, policy=tmp_path, output_dir=tmp_path, rollout_url="127.0.0.1:1", lora=SMALL)
    ok = GRPOConfig(dataset=tmp_path, policy=tmp_path, output_dir=tmp_path, rollout_url="http://h:1", lora=SMALL)
    assert ok.rollout_model and ok.rollout_adapter
