"""Pretraining on two Ray Train workers, DDP and FSDP: both train as one process would, and a run
killed with SIGKILL (driver, Ray and workers: its whole process group) and started again ends with
the weights of a run that was never interrupted.

Ray starts are the cost here (~10 s each), so they are few: one in this process for the uninterrupted
runs of both strategies, and three for one command that pretrains with DDP then FSDP, killed once in
each and then run to the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from infra import ray_executor
from infra.ray_executor import RayConfig, run_distributed
from stages import checkpoint as ckpt
from stages import collect, pretrain, tokenize, tokenizer
from stages.collect import CollectConfig
from stages.model import ModelConfig
from stages.pretrain import PretrainConfig
from stages.tokenize import TokenizeConfig
from stages.tokenizer import TokenizerConfig
from stages.train_loop import TrainConfig, read_metrics_log

pytestmark = pytest.mark.slow

TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, max_seq_len=64)
STEPS, EVERY = 24, 4
STRATEGIES = ("ddp", "fsdp")
REPO = Path(__file__).resolve().parents[2]
# The command that is killed and re-run: the stage through the Ray executor, one job after another.
COMMAND = """
import pickle, sys
from infra import ray_executor
ray_executor.ensure_ray(num_cpus=2)
for cfg, ray_cfg in pickle.loads(open(sys.argv[1], "rb").read()):
    ray_executor.run_distributed("pretrain", cfg, ray_cfg=ray_cfg)
ray_executor.shutdown()
"""


def config(data: dict[str, Path], output_dir: Path) -> PretrainConfig:
    # grad_accum=2: one row per micro-batch on each of 2 ranks, so the first backward of every step
    # skips the gradient reduction (DDP's no_sync, FSDP2's set_requires_gradient_sync) and the second does it.
    return PretrainConfig(tokens=data["tokens"], tokenizer=data["tokenizer"], output_dir=output_dir, model=TINY,
                          seq_len=32, batch_size=4, eval_windows=4,
                          train=TrainConfig(max_steps=STEPS, lr=3e-3, warmup_steps=2, checkpoint_every=EVERY,
                                            log_every=1, grad_accum=2, progress=False))


def weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(hf_dir / "model.safetensors")


def losses(output_dir: Path) -> list[float]:
    return [row["train/loss"] for row in read_metrics_log(output_dir)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp-data")
    corpus = collect.run(CollectConfig(output_dir=root / "collect", max_builtin_chars=40_000,
                                       arithmetic_problems=50)).dataset
    tok = tokenizer.run(TokenizerConfig(dataset=corpus, output_dir=root / "tok", vocab_size=512)).tokenizer_dir
    tokens = tokenize.run(TokenizeConfig(dataset=corpus, tokenizer=tok, output_dir=root / "tokens")).tokens
    return {"tokens": tokens, "tokenizer": tok, "root": root}


@pytest.fixture(scope="module")
def uninterrupted(data) -> dict[str, Path]:
    """Output dirs of one process and of an uninterrupted 2-worker run per strategy (one Ray start)."""
    root = data["root"]
    out = {"single": pretrain.run(config(data, root / "single")).checkpoint.parent}
    try:
        ray_executor.ensure_ray(num_cpus=2)
        for strategy in STRATEGIES:
            result = run_distributed("pretrain", config(data, root / strategy),
                                     ray_cfg=RayConfig(num_workers=2, strategy=strategy, max_failures=0))
            out[strategy] = result.checkpoint.parent
    finally:
        ray_executor.shutdown()
    return out


def test_ddp_and_fsdp_train_as_one_process_does(uninterrupted: dict[str, Path]) -> None:
    single = losses(uninterrupted["single"])
    assert len(single) == STEPS
    for strategy in STRATEGIES:
        curve = losses(uninterrupted[strategy])
        # Same initial weights, same global batch: the first loss is one process's, up to float summation order.
        assert curve[0] == pytest.approx(single[0], rel=1e-5), strategy
        # ...and training goes the same way (rank sums reorder float additions: close, not equal).
        assert curve == pytest.approx(single, rel=1e-3), strategy
        assert curve[-1] < curve[0] - 0.5, strategy
        final = uninterrupted[strategy] / "final"
        assert AutoModelForCausalLM.from_pretrained(final).config.hidden_size == 64
        assert not (final / ckpt.SHARDED).exists()  # the product is one plain HF checkpoint
        assert weights(final).keys() == weights(uninterrupted["single"] / "final").keys()  # tied head saved once

    # FSDP's step checkpoints hold each rank's shards; its HF files are the whole model.
    step = ckpt.latest_checkpoint(uninterrupted["fsdp"])
    assert sorted(p.name for p in (step / ckpt.SHARDED).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert "optimizer" not in ckpt.load_trainer_state(step)  # in the shards, not in rank 0's file
    assert weights(step).keys() == weights(uninterrupted["single"] / "final").keys()
    assert not (ckpt.latest_checkpoint(uninterrupted["ddp"]) / ckpt.SHARDED).exists()  # DDP: today's format


def _start(jobs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", COMMAND, str(jobs)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_once_checkpointed(proc: subprocess.Popen, output_dir: Path, timeout: float = 300) -> None:
    """SIGKILL the whole run as soon as `output_dir` has a complete checkpoint: the command's process
    group and every process under it (Ray's workers live in groups of their own, and would train on
    until Ray noticed the driver gone)."""
    deadline = time.monotonic() + timeout
    while ckpt.latest_checkpoint(output_dir) is None:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    proc.stderr.close()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, alive
    assert not ckpt.is_complete(output_dir), "the run finished before the kill: nothing was tested"


def _plant_incomplete(output_dir: Path, strategy: str) -> Path:
    """A newer checkpoint as a worker that died mid-save could leave it: everything but its completion marker.
    Resumed from, it would skip steps and change the final weights."""
    newest = ckpt.latest_checkpoint(output_dir)
    planted = ckpt.step_dir(output_dir, STEPS - EVERY)
    assert newest < planted
    shutil.copytree(newest, planted)
    marker = planted / (ckpt.SHARDED + "/.metadata" if strategy == "fsdp" else ckpt.TRAINER_STATE)
    marker.unlink()
    assert ckpt.latest_checkpoint(output_dir) == newest
    return planted


def test_kill_9_of_the_whole_run_resumes_to_the_uninterrupted_weights(data, uninterrupted, tmp_path: Path) -> None:
    outs = {s: tmp_path / f"killed-{s}" for s in STRATEGIES}
    jobs = tmp_path / "jobs.pkl"
    jobs.write_bytes(pickle.dumps([(config(data, outs[s]), RayConfig(num_workers=2, strategy=s, max_failures=0))
                                   for s in STRATEGIES]))
    # 1st run: killed during DDP. 2nd: DDP resumes and finishes, FSDP starts and is killed. 3rd: FSDP resumes.
    for strategy in STRATEGIES:
        _kill_once_checkpointed(_start(jobs), outs[strategy])
        _plant_incomplete(outs[strategy], strategy)
    last = _start(jobs)
    _, err = last.communicate(timeout=600)
    assert last.returncode == 0, err.decode()[-3000:]

    for strategy in STRATEGIES:
        resumed, straight = weights(outs[strategy] / "final"), weights(uninterrupted[strategy] / "final")
        assert resumed.keys() == straight.keys()
        mismatched = [k for k in straight if not torch.equal(resumed[k], straight[k])]
        assert not mismatched, f"{strategy}: resumed weights differ from the uninterrupted run: {mismatched}"
        # The log is whole again: the steps after the kill were redone, not skipped or doubled.
        steps = [row["step"] for row in read_metrics_log(outs[strategy])]
        assert steps == list(range(1, STEPS + 1)), strategy
        meta = json.loads((outs[strategy] / "final" / ckpt.META).read_text())
        assert meta["step"] == STEPS
