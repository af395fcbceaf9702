"""The training loop's contract under the conditions where it used to be wrong: sampling temperature,
uneven micro-batches, a retry of a finished stage, the curve on disk, and the first update of a reused
rollout. Each test fails on the code before its fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from stages import checkpoint as ckpt
from stages import dpo, grpo
from stages.dpo import DPOConfig
from stages.grpo import GRPOConfig
from stages.pretrain import lm_loss
from stages.rollout import sample, token_logprobs
from stages.tracking import RecordingTracker
from stages.train_loop import METRICS_LOG, micro_batch_weight, read_metrics_log, train

from .conftest import LINEAGE, Trained, quiet_train


def _tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def test_token_logprobs_at_a_temperature_equal_a_manual_tempered_softmax() -> None:
    model = _tiny_lm()
    ids = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    for temperature in (1.0, 0.7):
        manual = torch.gather(F.log_softmax(logits / temperature, dim=-1), 2, ids[:, 1:, None]).squeeze(-1)
        torch.testing.assert_close(token_logprobs(model, ids, attn, temperature=temperature), manual)
    assert not torch.allclose(token_logprobs(model, ids, attn, temperature=0.7), token_logprobs(model, ids, attn))


def test_selective_logprobs_have_the_gradient_of_the_full_log_softmax() -> None:
    model = _tiny_lm()
    ids = torch.randint(0, 50, (6, 8), generator=torch.Generator().manual_seed(2))
    token_logprobs(model, ids, torch.ones_like(ids), temperature=0.7, chunk_rows=4).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1].float() / 0.7
    torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None]).sum().backward()
    for a, p in zip(ours, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_scoring_only_the_tail_projects_only_the_tail_and_equals_the_full_scores() -> None:
    # RL scores completions: the prompt positions must not be projected onto the vocabulary at all.
    model = _tiny_lm()
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(5))
    attn = torch.ones_like(ids)
    widths: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]))
    full = token_logprobs(model, ids, attn, temperature=0.7)
    tail = token_logprobs(model, ids, attn, temperature=0.7, first_target=6)
    assert widths == [10, 5]  # logits at positions 5..9 score tokens 6..9 (the last one is dropped)
    assert tail.shape == (3, 4)
    torch.testing.assert_close(tail, full[:, 5:])
    with pytest.raises(ValueError, match="first_target"):
        token_logprobs(model, ids, attn, first_target=10)


def test_grpo_rollout_logprobs_are_taken_at_the_sampling_temperature(sft_trained: Trained) -> None:
    # Sampled at T=0.7, the reference log-probs GRPO stores must be those of softmax(logits / 0.7).
    model = ckpt.load_model(sft_trained.checkpoint)
    tok = ckpt.load_tokenizer(sft_trained.checkpoint)
    s = sample(model, tok, ["What is 2 + 3?"], n=2, max_new_tokens=6, temperature=0.7, seed=3)
    ids = torch.tensor([s.prompts[0] + s.completions[0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    manual = torch.gather(F.log_softmax(logits / 0.7, -1), 2, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(model, ids, torch.ones_like(ids), temperature=0.7), manual)


def _uneven_batch() -> dict[str, torch.Tensor]:
    # Rows with 7, 1, 1 and 4 loss tokens: rows and tokens weight very differently.
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 50, (4, 9), generator=g)
    labels = torch.full_like(ids, -100)
    for row, n in enumerate((7, 1, 1, 4)):
        labels[row, 9 - n:] = ids[row, 9 - n:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "loss_tokens": (labels[:, 1:] != -100).sum(1)}


def test_micro_batch_weight_is_the_token_share() -> None:
    b = _uneven_batch()
    first, second = {k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}
    assert micro_batch_weight(first, b, 1) == pytest.approx(8 / 13)
    assert micro_batch_weight(second, b, 1) == pytest.approx(5 / 13)
    rows_only = {k: v for k, v in b.items() if k != "loss_tokens"}
    assert micro_batch_weight({k: v[:1] for k, v in rows_only.items()}, rows_only, 1) == 0.25


def test_token_weighted_accumulation_equals_the_full_batch(tmp_path: Path, tokenizer_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    tok = ckpt.load_tokenizer(tokenizer_dir)
    batch = _uneven_batch()
    grads: dict[int, list[torch.Tensor]] = {}
    clip = torch.nn.utils.clip_grad_norm_
    for accum in (1, 2, 4):
        # The accumulated gradient, read where the loop clips it (after the last micro-batch).
        def record(params, max_norm, accum=accum):
            params = list(params)
            grads[accum] = [p.grad.clone() for p in params]
            return clip(params, max_norm)

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
        train(_tiny_lm(seed=5), tok, cfg=quiet_train(max_steps=1, lr=1e-2, warmup_steps=0, grad_accum=accum),
              batch_at=lambda step: batch, loss_fn=lm_loss, output_dir=tmp_path / f"accum{accum}", meta={})
    for accum in (2, 4):
        for a, b in zip(grads[accum], grads[1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_a_finished_stage_rerun_returns_it_unchanged(corpus: Path, sft_trained: Trained, tmp_path: Path) -> None:
    cfg = DPOConfig(dataset=corpus, policy=sft_trained.checkpoint, output_dir=tmp_path, batch_size=4,
                    lineage=LINEAGE, train=quiet_train(max_steps=2, lr=1e-4, warmup_steps=0, checkpoint_every=2))
    first = dpo.run(cfg)
    meta_bytes = (first.checkpoint / ckpt.META).read_bytes()
    weights = (first.checkpoint / "model.safetensors").read_bytes()
    tracker = RecordingTracker()
    again = dpo.run(cfg, tracker=tracker)
    assert again.metrics == first.metrics and "train/loss" in again.metrics
    assert (first.checkpoint / ckpt.META).read_bytes() == meta_bytes
    assert (first.checkpoint / "model.safetensors").read_bytes() == weights
    assert tracker.series("train/loss") == []  # nothing trained, nothing logged twice


def test_a_finished_stage_with_other_steps_is_refused(corpus: Path, sft_trained: Trained, tmp_path: Path) -> None:
    cfg = dict(dataset=corpus, policy=sft_trained.checkpoint, output_dir=tmp_path, batch_size=4, lineage=LINEAGE)
    dpo.run(DPOConfig(**cfg, train=quiet_train(max_steps=1, warmup_steps=0)))
    with pytest.raises(ValueError, match="finished run of 1 steps, not train.max_steps=3"):
        dpo.run(DPOConfig(**cfg, train=quiet_train(max_steps=3, warmup_steps=0)))


def test_metrics_jsonl_holds_every_window_once_across_a_resume(corpus: Path, sft_trained: Trained,
                                                                 tmp_path: Path) -> None:
    def cfg(steps):
        return DPOConfig(dataset=corpus, policy=sft_trained.checkpoint, output_dir=tmp_path, batch_size=4,
                         lineage=LINEAGE, train=quiet_train(max_steps=steps, lr=1e-4, warmup_steps=0,
                                                            log_every=1, checkpoint_every=2))
    dpo.run(cfg(3))
    # Simulate a run killed after step 3 whose last checkpoint is step 2: final/ and step 3 go away.
    import shutil
    shutil.rmtree(ckpt.final_dir(tmp_path))
    shutil.rmtree(ckpt.step_dir(tmp_path, 3))
    before = read_metrics_log(tmp_path)
    assert [r["step"] for r in before] == [1, 2, 3]
    dpo.run(cfg(4))
    rows = [json.loads(line) for line in (tmp_path / METRICS_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == before[:2]  # the windows before the checkpoint are kept as they were
    assert all(math.isfinite(r["train/loss"]) and "dpo/accuracy" in r for r in rows)


def test_dpo_precomputed_reference_trains_the_same_model(corpus: Path, sft_trained: Trained, tmp_path: Path) -> None:
    out = {}
    for precompute in (False, True):
        cfg = DPOConfig(dataset=corpus, policy=sft_trained.checkpoint, output_dir=tmp_path / str(precompute),
                        batch_size=4, precompute_ref=precompute, lineage=LINEAGE,
                        train=quiet_train(max_steps=2, lr=1e-3, warmup_steps=0))
        out[precompute] = dpo.run(cfg)
    assert out[True].metrics["train/loss"] == pytest.approx(out[False].metrics["train/loss"], rel=1e-5)
    a, b = ckpt.load_model(out[True].checkpoint), ckpt.load_model(out[False].checkpoint)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_first_update_of_each_rollout_has_ratio_one(corpus: Path, sft_trained: Trained, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, loss_type: str) -> None:
    # The "old" log-probs are the first update's own: ratio exactly 1 and no clipping at that update,
    # whatever the precision; the second update of the rollout sees the moved policy.
    seen = []
    real = grpo.grpo_loss

    def spy(logp, old, *args, **kwargs):
        seen.append(torch.exp(logp.detach() - old).masked_select(args[2].bool()))
        return real(logp, old, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    monkeypatch.setattr(grpo, "combined", lambda completions, **_: [len(c) / 10 for c in completions])
    cfg = GRPOConfig(dataset=corpus, policy=sft_trained.checkpoint, output_dir=tmp_path, group_size=4,
                     prompts_per_step=2, max_new_tokens=8, updates_per_rollout=2, loss_type=loss_type,
                     temperature=0.7, lineage=LINEAGE,
                     train=quiet_train(max_steps=4, lr=3e-3, warmup_steps=0, checkpoint_every=2, grad_accum=2))
    tracker = RecordingTracker()
    grpo.run(cfg, tracker=tracker)
    first_updates = [r for i, r in enumerate(seen) if (i // 2) % 2 == 0]  # 2 micro-batches per step
    later_updates = [r for i, r in enumerate(seen) if (i // 2) % 2 == 1]
    assert all(torch.equal(r, torch.ones_like(r)) for r in first_updates)
    assert any((r - 1).abs().max() > 1e-4 for r in later_updates)
    assert tracker.series("rl/clip_fraction")[0] == 0.0


def test_dpo_quarantines_bad_pairs_by_line_and_trains_on_the_rest(sft_trained: Trained, tmp_path: Path) -> None:
    rows = [{"prompt": "What is 2 + 3?", "chosen": "<answer>5</answer>", "rejected": "<answer>6</answer>"},
            {"prompt": "What is 1 + 1?", "chosen": "<answer>2</answer>", "rejected": "<answer>2</answer>"},
            {"prompt": "What is 4 + 4?", "chosen": "<answer>8</answer>"},
            {"prompt": [{"role": "user", "content": "What is 3 + 3?"}], "chosen": "<answer>6</answer>",
             "rejected": "<answer>7</answer>"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    cfg = DPOConfig(pairs=pairs, policy=sft_trained.checkpoint, output_dir=tmp_path / "dpo", batch_size=2,
                    lineage=LINEAGE, train=quiet_train(max_steps=1, warmup_steps=0))
    tracker = RecordingTracker()
    dpo.run(cfg, tracker=tracker)
    quarantined = [json.loads(line) for line in (tmp_path / "dpo" / "quarantine.jsonl").read_text().splitlines()]
    assert {q["source"]: q["reason"].split(":")[0] for q in quarantined} == {
        "pairs.jsonl:2": "chosen equals rejected", "pairs.jsonl:3": "rejected", "pairs.jsonl:5": "not a JSON object"}
    assert tracker.params["data/pairs"] == 2 and tracker.params["data/quarantined"] == 3

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match="no usable preference pairs"):
        dpo.run(DPOConfig(pairs=only_bad, policy=sft_trained.checkpoint, output_dir=tmp_path / "dpo-bad",
                          batch_size=2, lineage=LINEAGE, train=quiet_train(max_steps=1, warmup_steps=0)))


GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "gsm8k" / "train.jsonl"


@pytest.mark.skipif(not GSM8K.exists(), reason="../shared/datasets/gsm8k is not here")
def test_grpo_plumbing_run_on_a_gsm8k_sample(sft_trained: Trained, tmp_path: Path) -> None:
    # The CPU-sized plumbing run of the GSM8K recipe: real problems, the GSM8K verifier, two updates.
    sample_file = tmp_path / "gsm8k-sample.jsonl"
    sample_file.write_text("".join(GSM8K.read_text().splitlines(keepends=True)[:16]))
    cfg = GRPOConfig(gsm8k=sample_file, policy=sft_trained.checkpoint, output_dir=tmp_path / "grpo", group_size=2,
                     prompts_per_step=2, max_new_tokens=8, lineage=LINEAGE,
                     train=quiet_train(max_steps=2, lr=1e-4, warmup_steps=0, checkpoint_every=2))
    tracker = RecordingTracker()
    result = grpo.run(cfg, tracker=tracker)
    assert len(tracker.series("rl/reward_mean")) == 2 and all(math.isfinite(x) for x in tracker.series("rl/kl"))
    assert tracker.params["data/problems"] == 16
    assert ckpt.read_meta(result.checkpoint)["config"]["gsm8k"] == str(sample_file)
    with pytest.raises(ValueError, match="one source of problems"):
        GRPOConfig(gsm8k=sample_file, dataset=tmp_path, policy=tmp_path, output_dir=tmp_path)
