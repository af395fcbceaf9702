"""Numerical faults in the one training loop, and what it logs under DDP.

A fault (a non-finite loss or gradient norm, or a loss spike) is caught before the optimizer steps:
`on_fault=skip` drops that batch's update and counts it, `on_fault=stop` raises naming the step and
leaves the newest checkpoint as the last good state. Under DDP (two gloo processes on CPU) the logged
loss is the global batch's token mean, and a NaN on one rank makes every rank skip.

Faults are injected through the batch, so they stay a pure function of the step as the loop demands:
`poison` (added to the loss: 0 or NaN per row), `scale` (multiplies the loss: a spike) and `blowup`
(turns the gradient infinite while the loss stays finite).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from stages import checkpoint as ckpt
from stages.pretrain import lm_loss
from stages.tracking import RecordingTracker
from stages.train_loop import METRICS_LOG, TrainConfig, TrainingFault, lr_at, read_metrics_log, train

from .conftest import quiet_train

VOCAB, SEQ = 50, 9
ROW_TOKENS = (7, 1, 1, 4, 2)  # loss tokens per row: under world 2 rank 0 holds 10 of them, rank 1 holds 5


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      initializer_range=0.3)  # far from uniform logits: per-token losses differ
    return LlamaForCausalLM(cfg)


def batch(step: int, *, poison_rows: tuple[int, ...] = (), scale: float = 1.0,
          blowup: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (len(ROW_TOKENS), SEQ), generator=torch.Generator().manual_seed(100 + step))
    labels = torch.full_like(ids, -100)
    for row, n in enumerate(ROW_TOKENS):
        labels[row, SEQ - n:] = ids[row, SEQ - n:]
    poison = torch.zeros(len(ROW_TOKENS))
    poison[list(poison_rows)] = float("nan")
    rows = len(ROW_TOKENS)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "loss_tokens": (labels[:, 1:] != -100).sum(1), "poison": poison,
            "scale": torch.full((rows,), scale), "blowup": torch.full((rows,), float(blowup))}


def faulty_loss(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    loss, metrics = lm_loss(model, mb)
    loss = loss * mb["scale"].max() + mb["poison"].sum()  # x * 1.0 + 0.0 == x: a clean batch is untouched
    if mb["blowup"].any():
        loss.register_hook(lambda g: g * float("inf"))
    return loss, metrics


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.isfinite(v).all() for v in a.values())
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ


def run(tok, out: Path, cfg: TrainConfig, batch_at: Callable[[int], dict], tracker=None) -> dict[str, torch.Tensor]:
    model = tiny_lm()
    train(model, tok, cfg=cfg, batch_at=batch_at, loss_fn=faulty_loss, output_dir=out, meta={}, tracker=tracker)
    return weights(model)


CONSTANT_LR = dict(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=100)


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path):
    return ckpt.load_tokenizer(tokenizer_dir)


def test_skip_drops_exactly_the_nan_batch_and_counts_it(tok, tmp_path: Path) -> None:
    # Step 3 (index 2) turns NaN: the run equals one that never saw that batch (constant LR, so the
    # schedule slot the skipped step keeps changes nothing here; Adam took no step either).
    faulted = run(tok, tmp_path / "skip", quiet_train(max_steps=5, on_fault="skip", **CONSTANT_LR),
                  lambda s: batch(s, poison_rows=(1,) if s == 2 else ()))
    order = [0, 1, 3, 4]
    without = run(tok, tmp_path / "without", quiet_train(max_steps=4, **CONSTANT_LR), lambda s: batch(order[s]))
    assert_same_weights(faulted, without)

    rows = read_metrics_log(tmp_path / "skip")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["train/skipped_batches"] for r in rows] == [0, 0, 1, 1, 1]
    assert rows[2]["faults"] == [{"step": 3, "reason": "loss is nan", "action": "skip"}]
    assert "train/loss" not in rows[2]  # the window held only the skipped step: no NaN in the curve
    assert all(math.isfinite(r["train/loss"]) and "faults" not in r for r in rows[:2] + rows[3:])
    assert ckpt.read_meta(ckpt.final_dir(tmp_path / "skip"))["metrics"]["train/skipped_batches"] == 1


class Killed(RuntimeError):
    pass


class KillAt(RecordingTracker):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.kill_step = step

    def log_metrics(self, metrics, step=None) -> None:
        if step == self.kill_step:
            raise Killed(step)
        super().log_metrics(metrics, step)


def test_a_skipped_step_keeps_its_lr_slot_and_resumes_exactly(tok, tmp_path: Path) -> None:
    cfg = quiet_train(max_steps=6, lr=1e-2, warmup_steps=2, checkpoint_every=2, on_fault="skip")

    def poisoned(s):
        return batch(s, poison_rows=(0,) if s == 2 else ())

    straight = RecordingTracker()
    uninterrupted = run(tok, tmp_path / "a", cfg, poisoned, straight)
    # The schedule advanced through the skipped step: every logged LR is the schedule's at that step.
    assert straight.series("train/lr") == pytest.approx([lr_at(s, cfg) for s in range(1, 7)])

    with pytest.raises(Killed):  # killed after the step-4 checkpoint, which follows the fault at step 3
        run(tok, tmp_path / "b", cfg, poisoned, KillAt(5))
    resumed_tracker = RecordingTracker()
    resumed = run(tok, tmp_path / "b", cfg, poisoned, resumed_tracker)
    assert [s for s, _ in resumed_tracker.metrics] == [5, 6]
    assert resumed_tracker.series("train/skipped_batches") == [1, 1]  # the count came back with the checkpoint
    assert resumed_tracker.series("train/loss") == straight.series("train/loss")[-2:]
    assert_same_weights(resumed, uninterrupted)


def test_stop_names_the_step_and_leaves_the_last_good_checkpoint(tok, tmp_path: Path) -> None:
    cfg = quiet_train(max_steps=6, **{**CONSTANT_LR, "checkpoint_every": 2})
    clean = run(tok, tmp_path / "clean", cfg, batch)
    out = tmp_path / "stop"
    # Step 4 is a checkpoint step: its NaN must stop the run before that checkpoint is written.
    with pytest.raises(TrainingFault, match=r"step 4: loss is nan; stopped before its update") as e:
        run(tok, out, cfg, lambda s: batch(s, poison_rows=(3,) if s == 3 else ()))
    assert e.value.step == 4 and e.value.checkpoint == ckpt.step_dir(out, 2)
    assert str(ckpt.step_dir(out, 2)) in str(e.value)
    assert ckpt.latest_checkpoint(out) == ckpt.step_dir(out, 2)
    assert not ckpt.step_dir(out, 4).exists() and not ckpt.is_complete(out)
    state = ckpt.load_trainer_state(ckpt.step_dir(out, 2))
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert all(torch.isfinite(p).all() for p in ckpt.load_model(ckpt.step_dir(out, 2)).parameters())
    last_row = read_metrics_log(out)[-1]
    assert last_row == {"step": 4, "faults": [{"step": 4, "reason": "loss is nan", "action": "stop"}]}

    # The data fixed, the same command resumes from the last good checkpoint and ends where a clean run does.
    tracker = RecordingTracker()
    assert_same_weights(run(tok, out, cfg, batch, tracker), clean)
    assert [s for s, _ in tracker.metrics] == [3, 4, 5, 6]
    assert [r["step"] for r in read_metrics_log(out)] == [1, 2, 3, 4, 5, 6]  # the fault row went with the resume


def test_a_nonfinite_grad_norm_with_a_finite_loss_is_a_fault(tok, tmp_path: Path) -> None:
    faulted = run(tok, tmp_path / "skip", quiet_train(max_steps=3, on_fault="skip", **CONSTANT_LR),
                  lambda s: batch(s, blowup=s == 1))
    rows = read_metrics_log(tmp_path / "skip")
    (fault,) = rows[1]["faults"]
    assert fault["step"] == 2 and fault["reason"].startswith("grad norm is ")
    assert all(math.isfinite(r["train/loss"]) for r in (rows[0], rows[2]))
    assert all(torch.isfinite(v).all() for v in faulted.values())
    with pytest.raises(TrainingFault, match="step 2: grad norm is"):
        run(tok, tmp_path / "stop", quiet_train(max_steps=3, **CONSTANT_LR), lambda s: batch(s, blowup=s == 1))


SCALES = {1: 10.0, 5: 1.5, 6: 10.0}  # a spike in warm-up, a bump under the threshold, a real spike


@pytest.mark.parametrize("on_fault", ["skip", "stop"])
def test_a_loss_spike_beyond_the_threshold_is_caught_after_warmup(tok, tmp_path: Path, on_fault: str) -> None:
    cfg = quiet_train(max_steps=8, on_fault=on_fault, spike_factor=3.0, spike_warmup=3, **CONSTANT_LR)

    def spiky(s):
        return batch(s, scale=SCALES.get(s, 1.0))

    if on_fault == "stop":
        with pytest.raises(TrainingFault, match=r"step 7: loss spike: \S+ > 3 x \S+, the median loss of the last 6"):
            run(tok, tmp_path, cfg, spiky)
        return
    run(tok, tmp_path, cfg, spiky)
    rows = read_metrics_log(tmp_path)
    faults = [f for r in rows for f in r.get("faults", [])]
    assert [f["step"] for f in faults] == [7] and faults[0]["reason"].startswith("loss spike: ")
    assert rows[-1]["train/skipped_batches"] == 1
    assert rows[1]["train/loss"] > 3 * rows[0]["train/loss"]  # the warm-up spike was real, and let through
    assert "train/loss" in rows[5] and "train/loss" not in rows[6]  # the 1.5x bump trained, the spike did not


def test_config_names_the_fault_fields() -> None:
    with pytest.raises(ValueError, match="train.on_fault"):
        TrainConfig(on_fault="ignore")
    with pytest.raises(ValueError, match="train.spike_factor"):
        TrainConfig(spike_factor=0.5)
    with pytest.raises(ValueError, match="train.spike_window"):
        TrainConfig(spike_window=0)


# --- DDP: two gloo processes on CPU ---------------------------------------------------------------

DDP_TRAIN = dict(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=100, grad_accum=2)


def _ddp_worker(rank: int, world: int, rendezvous: str, tokenizer_dir: str, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        tok = ckpt.load_tokenizer(Path(tokenizer_dir))
        out_dir = Path(out)
        clean = run(tok, out_dir / "clean", quiet_train(max_steps=2, **DDP_TRAIN), batch)
        # Row 1 is rank 1's (rows are dealt round-robin): only that rank sees the NaN.
        poisoned = run(tok, out_dir / "poison", quiet_train(max_steps=3, on_fault="skip", **DDP_TRAIN),
                       lambda s: batch(s, poison_rows=(1,) if s == 1 else ()))
        order = [0, 2]
        without = run(tok, out_dir / "without", quiet_train(max_steps=2, **DDP_TRAIN), lambda s: batch(order[s]))
        torch.save({"clean": clean, "poison": poisoned, "without": without}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, *args, timeout_s: float = 240) -> None:
    # fork: the workers inherit the imported torch and transformers (a fresh spawn imports them for ~10 s)
    ctx = mp.start_processes(_ddp_worker, args=(world, *args), nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:  # a rank waiting in an all-reduce the others never join
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers still running after {timeout_s} s: a collective hung")


def test_ddp_logs_the_token_weighted_global_loss_and_skips_on_every_rank(tokenizer_dir: Path, tok,
                                                                         tmp_path: Path) -> None:
    _spawn(2, str(tmp_path / "rendezvous"), str(tokenizer_dir), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # The logged step-1 loss is the token mean of the whole global batch under the initial weights.
    b = batch(0)
    with torch.no_grad():
        global_mean = float(lm_loss(tiny_lm(), b)[0])
        shard_means = [float(lm_loss(tiny_lm(), {k: v[r::2] for k, v in b.items()})[0]) for r in range(2)]
    logged = [json.loads(line) for line in (tmp_path / "clean" / METRICS_LOG).read_text().splitlines()]
    assert logged[0]["train/loss"] == pytest.approx(global_mean, rel=1e-6)
    assert global_mean == pytest.approx((10 * shard_means[0] + 5 * shard_means[1]) / 15, rel=1e-6)  # 10 + 5 tokens
    # The shards' losses are far apart, so neither rank 0's shard nor the unweighted mean of shards would pass.
    assert abs(global_mean - sum(shard_means) / 2) > 1e-3 and abs(global_mean - shard_means[0]) > 1e-3

    # The gradients are weighted by tokens too: two ranks train the weights one process does.
    single = run(ckpt.load_tokenizer(tokenizer_dir), tmp_path / "single", quiet_train(max_steps=2, **DDP_TRAIN), batch)
    for name, value in single.items():
        torch.testing.assert_close(ranks[0]["clean"][name], value, atol=1e-6, rtol=1e-5, msg=name)

    # A NaN loss on rank 1 alone (its gradient is finite: the poison is a constant): both ranks skip
    # step 2, so both hold the weights of a run that never saw that batch.
    for r in range(2):
        assert_same_weights(ranks[r]["poison"], ranks[r]["without"])
    assert_same_weights(ranks[0]["poison"], ranks[1]["poison"])
    rows = read_metrics_log(tmp_path / "poison")
    assert [r["train/skipped_batches"] for r in rows] == [0, 1, 1]
    assert [f["step"] for f in rows[1]["faults"]] == [2]
    assert math.isfinite(rows[2]["train/loss"])
