"""Model presets: each is the size its name says, servable (head_dim >= 32), and the MoE one trains with
its load-balancing loss inside the loss and saves a checkpoint transformers loads and generates from."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from stages import pretrain
from stages.config import PRESETS_DIR, from_dict, load_preset
from stages.model import ModelConfig, active_parameters, build_model, count_parameters, loss_parts
from stages.planner import _VocabOnly, preset_model
from stages.tracking import RecordingTracker

from .conftest import pretrain_config

# What each preset's name (or, without a size in it, its comment) promises, in parameters.
TARGETS = {"tiny": 1.3e6, "small": 20e6, "gpt2-124m": 124e6, "350m": 350e6, "1b": 1e9, "moe-tiny": 2.3e6}
MODEL_PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml") if "model" in load_preset(p.stem))


def preset_model_config(name: str) -> ModelConfig:
    return from_dict(ModelConfig, load_preset(name)["model"], prefix="model.")


def test_every_model_preset_declares_its_size() -> None:
    assert set(MODEL_PRESETS) == set(TARGETS)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_preset_has_the_size_of_its_name_and_is_servable(name: str) -> None:
    n, shape = preset_model(name)  # counted on the meta device: the 1B preset allocates nothing
    assert abs(n - TARGETS[name]) <= 0.15 * TARGETS[name], f"{name}: {n:,} parameters"
    cfg = preset_model_config(name)
    assert cfg.hidden_size // cfg.num_heads >= 32
    assert load_preset(name)["pretrain"]["seq_len"] <= cfg.max_seq_len


def test_moe_preset_activates_a_fraction_of_its_parameters() -> None:
    cfg = preset_model_config("moe-tiny")
    with torch.device("meta"):
        model = build_model(cfg, _VocabOnly(4100))
    assert isinstance(model, MixtralForCausalLM)
    inactive_experts = cfg.num_layers * (cfg.num_experts - cfg.experts_per_token)
    assert count_parameters(model) - active_parameters(model) == inactive_experts * 3 * 128 * 256
    with torch.device("meta"):
        dense = build_model(preset_model_config("tiny"), _VocabOnly(4100))
    assert active_parameters(dense) == count_parameters(dense)


def test_dense_presets_build_the_weights_they_built_before_moe_existed() -> None:
    # sha256 of tiny's seed-0 weights (vocab 4100) from build_model before the architecture field:
    # existing checkpoints and tests keep their meaning.
    model = build_model(preset_model_config("tiny"), _VocabOnly(4100), seed=0)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    assert h.hexdigest() == "33dbe4737bebc65e8797c40c7673a7caea46e0069af618492768777d28a0b7dd"


def test_model_config_names_the_wrong_moe_field() -> None:
    dense = {"hidden_size": 64, "num_heads": 2, "num_kv_heads": 1}
    with pytest.raises(ValueError, match="model.architecture must be one of llama, mixtral"):
        ModelConfig(architecture="gpt2", **dense)
    with pytest.raises(ValueError, match=r"model\.num_experts is set but model\.architecture=llama"):
        ModelConfig(num_experts=4, **dense)
    with pytest.raises(ValueError, match=r"model\.router_aux_loss_coef is set"):
        ModelConfig(router_aux_loss_coef=0.1, **dense)
    with pytest.raises(ValueError, match=r"model\.num_experts=0: .*at least 2"):
        ModelConfig(architecture="mixtral", **dense)
    with pytest.raises(ValueError, match=r"model\.experts_per_token=5 must be in \[1, num_experts=4\]"):
        ModelConfig(architecture="mixtral", num_experts=4, experts_per_token=5, **dense)
    with pytest.raises(ValueError, match=r"model\.router_aux_loss_coef=-0\.1"):
        ModelConfig(architecture="mixtral", num_experts=4, router_aux_loss_coef=-0.1, **dense)
    assert ModelConfig(architecture="mixtral", num_experts=4, **dense).is_moe


def test_moe_loss_is_cross_entropy_plus_the_weighted_balancing_loss() -> None:
    cfg = from_dict(ModelConfig, {**load_preset("moe-tiny")["model"], "router_aux_loss_coef": 0.5}, prefix="model.")
    model = build_model(cfg, _VocabOnly(300), seed=0)
    x = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=x, labels=x)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    # Switch's loss is experts_per_token when routing is uniform, more when skewed: never ~0.
    assert out.aux_loss.item() >= 0.9 * cfg.experts_per_token
    assert torch.allclose(out.loss, ce + 0.5 * out.aux_loss, atol=1e-5)
    parts = loss_parts(model, out)
    assert parts["train/aux_loss"] == pytest.approx(out.aux_loss.item())
    assert parts["train/lm_loss"] == pytest.approx(ce.item(), abs=1e-5)
    # The balancing term alone sends a gradient to every layer's router.
    out.aux_loss.backward()
    assert all(layer.mlp.gate.weight.grad.abs().sum() > 0 for layer in model.model.layers)
    dense = build_model(preset_model_config("tiny"), _VocabOnly(300))
    assert loss_parts(dense, dense(input_ids=x, labels=x)) == {}


def test_moe_preset_pretrains_and_saves_a_checkpoint_transformers_generates_from(
        tokens: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    base = pretrain_config(tokens, tokenizer_dir, tmp_path, max_steps=12, checkpoint_every=6)
    cfg = dataclasses.replace(base, model=preset_model_config("moe-tiny"))
    tracker = RecordingTracker()
    result = pretrain.run(cfg, tracker=tracker)
    losses = tracker.series("train/loss")
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    # The load-balancing loss is logged beside the total, which is the LM loss plus coef x aux.
    aux, lm = tracker.series("train/aux_loss"), tracker.series("train/lm_loss")
    assert len(aux) == 12 and all(a > 1.0 for a in aux)  # ~experts_per_token=2 when balanced
    assert all(abs(t - (m + 0.01 * a)) < 1e-4 for t, m, a in zip(losses, lm, aux, strict=True))
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert isinstance(model, MixtralForCausalLM)
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (4, 2)
    assert model.config.output_router_logits  # fine-tuning the checkpoint keeps balancing its router
    prompt = torch.tensor([[model.config.bos_token_id or 0, 5, 6, 7]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 10)
