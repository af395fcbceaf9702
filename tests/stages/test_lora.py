"""LoRA through peft: only the adapter trains, checkpoints are the merged model (base + alpha/r * B @ A)
plus the adapter, r=0 is full fine-tuning, a killed LoRA run resumes to the same adapter, and 4-bit
QLoRA is refused off CUDA (tests/gpu/test_qlora.py runs it on a GPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stages import checkpoint as ckpt
from stages import lora, sft
from stages.chat import load_problems, prompt_and_response
from stages.config import from_dict, parse_overrides
from stages.lora import LoraConfig
from stages.pretrain import lm_loss
from stages.rollout import pad_right
from stages.sft import SFTConfig
from stages.tasks.arithmetic import target
from stages.tracking import RecordingTracker
from stages.train_loop import train

from .conftest import LINEAGE, Trained, quiet_train
from .test_training import assert_every_parameter_changed

SMALL = LoraConfig(r=4, alpha=8)  # scale 2


def lora_sft_config(corpus: Path, policy: Path, output_dir: Path) -> SFTConfig:
    # Packed rows too: the adapter's forward must pass position_ids through to the base.
    return SFTConfig(dataset=corpus, policy=policy, output_dir=output_dir, batch_size=4, packing=True, seq_len=128,
                     lora=SMALL, lineage=LINEAGE,
                     train=quiet_train(max_steps=4, lr=1e-2, warmup_steps=1, checkpoint_every=2))


@pytest.fixture(scope="module")
def lora_sft(corpus: Path, pretrained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    cfg = lora_sft_config(corpus, pretrained.checkpoint, tmp_path_factory.mktemp("lora-sft"))
    tracker = RecordingTracker()
    return Trained(cfg, sft.run(cfg, tracker=tracker), tracker)


def test_lora_config_from_the_command_line() -> None:
    cfg = from_dict(SFTConfig, {"dataset": "d", "policy": "p", "output_dir": "o",
                                **parse_overrides(["lora.r=64"])})
    assert cfg.lora == LoraConfig(r=64, alpha=16, target_modules=("q_proj", "v_proj")) and cfg.lora.scale == 0.25
    cfg = from_dict(SFTConfig, {"dataset": "d", "policy": "p", "output_dir": "o",
                                **parse_overrides(["lora.target_modules=[q_proj,k_proj,v_proj]", "lora.r=8"])})
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert SFTConfig(dataset=Path("d"), policy=Path("p"), output_dir=Path("o")).lora.r == 0  # full fine-tuning
    for bad, match in ((dict(r=-1), "lora.r"), (dict(r=8, quantize="8bit"), "lora.quantize"),
                       (dict(quantize="4bit"), r"quantize=4bit needs lora.r > 0"), (dict(r=8, target_modules=()),
                                                                                     "lora.target_modules")):
        with pytest.raises(ValueError, match=match):
            LoraConfig(**bad)


def test_lifecycle_sets_the_sft_adapter_as_sft_lora(tmp_path: Path) -> None:
    from flows.lifecycle_config import LifecycleConfig

    cfg = LifecycleConfig.load("tiny", ["sft.lora.r=64"]).build("sft", dataset=tmp_path, policy=tmp_path,
                                                                tokens=tmp_path, output_dir=tmp_path)
    assert cfg.lora.r == 64 and cfg.lora.alpha == 16


def test_r0_is_full_fine_tuning(sft_trained: Trained, pretrained: Trained) -> None:
    model = ckpt.load_model(pretrained.checkpoint)
    assert lora.apply(model, LoraConfig()) is model and not lora.is_adapted(model)
    assert not (sft_trained.checkpoint / ckpt.ADAPTER).exists()
    assert "adapter" not in ckpt.read_meta(sft_trained.checkpoint)
    assert_every_parameter_changed(ckpt.load_model(pretrained.checkpoint), ckpt.load_model(sft_trained.checkpoint))


def arithmetic_batches(corpus: Path, tok, size: int):
    examples = [prompt_and_response(tok, p.question, target(p)) for p in load_problems(corpus, "train")]

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        picked = [examples[(step * size + i) % len(examples)] for i in range(size)]
        ids, attn, mask = pad_right([e[0] for e in picked], tok.pad_token_id, [e[1] for e in picked])
        return {"input_ids": ids, "attention_mask": attn, "labels": ids.masked_fill(mask == 0, -100)}

    return batch_at


def test_lora_trains_every_adapter_weight_and_no_base_weight(corpus: Path, pretrained: Trained, tmp_path: Path) -> None:
    tok = ckpt.load_tokenizer(pretrained.checkpoint)
    model = ckpt.load_policy(pretrained.checkpoint, SMALL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # Two layers x (q_proj, v_proj) x (A, B), nothing else.
    assert len(trainable) == 8 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all((".q_proj." in n) or (".v_proj." in n) for n in trainable)
    train(model, tok, cfg=quiet_train(max_steps=3, lr=1e-2, warmup_steps=1, checkpoint_every=3),
          batch_at=arithmetic_batches(corpus, tok, 8), loss_fn=lm_loss, output_dir=tmp_path, meta={"stage": "test"})

    after = dict(model.named_parameters())
    unchanged = [n for n in trainable if torch.equal(before[n], after[n])]
    assert not unchanged, f"adapter weights that did not change: {unchanged}"
    moved = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert not moved, f"frozen base weights that changed: {moved}"

    # The checkpoint is the merged model, equal to the live adapted one.
    final = ckpt.final_dir(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert type(merged).__name__ == "LlamaForCausalLM"
    ids = arithmetic_batches(corpus, tok, 4)(0)
    with torch.no_grad():
        want = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        got = merged(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The resumable state holds the adapter alone (the lead's trainer state names the live parameters).
    state = ckpt.load_trainer_state(ckpt.step_dir(tmp_path, 3))
    assert sorted(state["trainable"]) == sorted(trainable)


def test_merged_checkpoint_is_base_plus_scaled_b_a(lora_sft: Trained, pretrained: Trained) -> None:
    final = lora_sft.checkpoint
    assert {"config.json", "model.safetensors", "chat_template.jinja", ckpt.META} <= {p.name for p in final.iterdir()}
    assert ckpt.read_meta(final)["adapter"] == ckpt.ADAPTER
    adapter_cfg = json.loads((final / ckpt.ADAPTER / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8 and set(adapter_cfg["target_modules"]) == {"q_proj", "v_proj"}
    adapter = load_file(final / ckpt.ADAPTER / "adapter_model.safetensors")
    merged = load_file(final / "model.safetensors")
    base = ckpt.load_model(pretrained.checkpoint).state_dict()
    assert not any("lora" in k or "base_layer" in k for k in merged)
    assert "quantization_config" not in json.loads((final / "config.json").read_text())

    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape[1] == 4 and b.abs().sum() > 0  # B left zero init: it trained
    key = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], base[key] + (8 / 4) * b @ a, atol=1e-6, rtol=0)
    assert not torch.equal(merged[key], base[key])
    untouched = [k for k in base if not k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched if k in merged)

    # The adapter hot-loads over the parent and is the same model as the merged directory.
    plain = AutoModelForCausalLM.from_pretrained(final)
    adapted = PeftModel.from_pretrained(ckpt.load_model(pretrained.checkpoint), final / ckpt.ADAPTER)
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, adapted(x).logits, atol=1e-4, rtol=1e-4)
    # Same as peft's own merge on a copy.
    reference = adapted.merge_and_unload().state_dict()
    assert all(torch.allclose(reference[k], merged[k], atol=1e-6) for k in merged)
    losses = lora_sft.tracker.series("train/loss")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


class Killed(RuntimeError):
    pass


class KillAtStep(RecordingTracker):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.kill_step = step

    def log_metrics(self, metrics, step=None) -> None:
        if step == self.kill_step:
            raise Killed(f"killed at step {step}")
        super().log_metrics(metrics, step)


def test_lora_resume_matches_an_uninterrupted_run(lora_sft: Trained, corpus: Path, pretrained: Trained,
                                                  tmp_path: Path) -> None:
    cfg = lora_sft_config(corpus, pretrained.checkpoint, tmp_path)
    with pytest.raises(Killed):
        sft.run(cfg, tracker=KillAtStep(3))
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 2) and not ckpt.is_complete(tmp_path)
    resumed = RecordingTracker()
    sft.run(cfg, tracker=resumed)

    steps = [s for s, m in resumed.metrics if "train/loss" in m]
    assert steps == [3, 4]
    assert resumed.series("train/loss") == lora_sft.tracker.series("train/loss")[2:]
    for name in (ckpt.ADAPTER + "/adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(lora_sft.checkpoint / name), load_file(ckpt.final_dir(tmp_path) / name)
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: resumed weights differ from the uninterrupted run: {differ}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, 4-bit loads (tests/gpu/test_qlora.py)")
def test_qlora_off_cuda_is_a_clear_error_naming_the_key(corpus: Path, pretrained: Trained, tmp_path: Path) -> None:
    cfg = SFTConfig(dataset=corpus, policy=pretrained.checkpoint, output_dir=tmp_path,
                    lora=LoraConfig(r=8, quantize="4bit"), train=quiet_train(max_steps=1))
    with pytest.raises(ValueError, match=r"sft\.lora\.quantize=4bit .*needs a CUDA GPU.*sft\.lora\.quantize=none"):
        sft.run(cfg)
    assert not ckpt.is_complete(tmp_path) and not (tmp_path / "checkpoints").exists()
