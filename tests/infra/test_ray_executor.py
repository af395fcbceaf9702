"""The Ray executor: the result and the final checkpoint come back through Ray Train's storage.

On a cluster the driver sees neither the workers' disks nor their output_dir, so the test keeps Ray's
storage path apart from the driver's working directory and the stage's output_dir, and checks the
driver's copy of the checkpoint is the one Ray stored, also when it has to be copied back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flows import cli
from infra import ray_executor
from infra.ray_executor import RayConfig, check_world_size, run_distributed, with_strategy
from stages import collect, tokenize, tokenizer
from stages.collect import CollectConfig
from stages.config import ConfigError
from stages.model import ModelConfig
from stages.pretrain import PretrainConfig
from stages.tokenize import TokenizeConfig
from stages.tokenizer import TokenizerConfig
from stages.train_loop import TrainConfig

TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, max_seq_len=64)


def pretrain_cfg(output_dir: Path, tokens: Path = Path("/nonexistent"), tok: Path = Path("/nonexistent"),
                 batch_size: int = 4) -> PretrainConfig:
    return PretrainConfig(tokens=tokens, tokenizer=tok, output_dir=output_dir, model=TINY, seq_len=32,
                          batch_size=batch_size, eval_windows=4,
                          train=TrainConfig(max_steps=4, lr=3e-3, warmup_steps=1, checkpoint_every=2,
                                            log_every=1, progress=False))


def weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(hf_dir / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_batch_smaller_than_world_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    ray_was_up = ray.is_initialized()
    with pytest.raises(ConfigError, match=r"pretrain\.batch_size=1 .* ray\.num_workers=2"):
        run_distributed("pretrain", pretrain_cfg(tmp_path / "out", batch_size=1), ray_cfg=RayConfig(num_workers=2))
    assert ray.is_initialized() == ray_was_up  # no Ray started for a config that cannot run
    assert not (tmp_path / "out").exists()
    # One row per rank is enough, and an uneven split is weighted by the loop, not refused.
    for batch in (2, 3):
        check_world_size(pretrain_cfg(tmp_path, batch_size=batch), RayConfig(num_workers=2))


def test_ray_strategy_is_the_training_loops_strategy_in_the_flow_and_the_stage_command(tmp_path: Path, capsys) -> None:
    cfg = pretrain_cfg(tmp_path)
    sharded = with_strategy(cfg, RayConfig(strategy="fsdp"))
    assert sharded.train.strategy == "fsdp" and sharded.train.max_steps == cfg.train.max_steps
    assert with_strategy(cfg, RayConfig()).train.strategy == "ddp"
    with pytest.raises(ConfigError, match="ray.strategy=fsdp needs a stage with a training loop"):
        with_strategy(type("Cfg", (), {})(), RayConfig(strategy="fsdp"))

    # `flywheel stage pretrain ... ray.*` goes through the same executor, over the preset's ray section:
    # its num_workers=2 meets batch_size=1 and is refused there, before any Ray starts.
    stage = ["stage", "pretrain", "tokens=/nonexistent", "tokenizer=/nonexistent", f"output_dir={tmp_path / 'o'}"]
    assert cli.main([*stage, "batch_size=1", "ray.strategy=fsdp"]) == 2
    assert "pretrain.batch_size=1 is smaller than ray.num_workers=2" in capsys.readouterr().err
    assert cli.main([*stage, "ray.strategy=zero3"]) == 2
    assert "ray.strategy must be ddp or fsdp" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.slow
def test_result_and_checkpoint_come_back_through_ray_storage(tmp_path: Path, monkeypatch) -> None:
    corpus = collect.run(CollectConfig(output_dir=tmp_path / "collect", max_builtin_chars=40_000,
                                       arithmetic_problems=50)).dataset
    tok = tokenizer.run(TokenizerConfig(dataset=corpus, output_dir=tmp_path / "tok", vocab_size=512)).tokenizer_dir
    tokens = tokenize.run(TokenizeConfig(dataset=corpus, tokenizer=tok, output_dir=tmp_path / "tokens")).tokens
    storage, out, cwd = tmp_path / "ray-storage", tmp_path / "runs" / "r1" / "pretrain", tmp_path / "driver-cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("FLYWHEEL_RAY_STORAGE", str(storage))
    cfg = pretrain_cfg(out, tokens, tok)
    try:
        ray_executor.ensure_ray(num_cpus=2)
        result = run_distributed("pretrain", cfg, ray_cfg=RayConfig(num_workers=2))
    finally:
        ray_executor.shutdown()

    assert result.checkpoint == out / "final"
    assert torch.isfinite(torch.tensor(result.metrics["train/loss"]))
    assert result.metrics["time/stage_s"] > 0
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert model.config.hidden_size == 64
    # Ray's storage holds the one reported checkpoint: the stage's result and its final HF checkpoint.
    stored = list(storage.glob(f"pretrain-r1-pretrain/checkpoint_*/{ray_executor.HF_DIR}"))
    assert len(stored) == 1, list(storage.rglob("*"))
    assert (stored[0].parent / ray_executor.RESULT_FILE).exists()
    assert_same_weights(result.checkpoint, stored[0])
    assert not list(out.glob(".ray-report-*")) and not list(cwd.iterdir())

    # A driver on another node has no output_dir/final: it is copied in from Ray's storage.
    shutil.rmtree(out)
    again = ray_executor._result_from(ray.train.Checkpoint.from_directory(str(stored[0].parent)), out)
    assert again.checkpoint == out / "final" and again.metrics == result.metrics
    assert_same_weights(again.checkpoint, stored[0])
    AutoModelForCausalLM.from_pretrained(again.checkpoint)


def test_a_training_fault_comes_back_as_the_error_not_as_a_retry(tmp_path: Path) -> None:
    """A NaN stop is deterministic: workers hand it back like a result, and the driver raises it as it was."""
    import pickle

    from ray.train import Checkpoint

    from stages.train_loop import TrainingFault

    (tmp_path / "ckpt").mkdir()
    fault = TrainingFault("pretrain: step 4: loss is nan", step=4, reason="loss is nan",
                          checkpoint=tmp_path / "step-000002")
    (tmp_path / "ckpt" / ray_executor.RESULT_FILE).write_bytes(pickle.dumps(fault))
    with pytest.raises(TrainingFault, match="step 4: loss is nan") as err:
        ray_executor._result_from(Checkpoint.from_directory(str(tmp_path / "ckpt")), tmp_path / "out")
    assert (err.value.step, err.value.reason, err.value.checkpoint) == (4, "loss is nan", tmp_path / "step-000002")


def test_without_ray_address_each_process_starts_its_own_ray(tmp_path: Path, monkeypatch) -> None:
    """Two `flywheel` processes on one state root: the second must not join the first's Ray (Ray's
    default finds it through the temp dir's `ray_current_cluster`), or it dies when the first exits."""
    import subprocess
    import sys

    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    probe = ("from infra import ray_executor; import ray; ray_executor.ensure_ray(num_cpus=1); "
             "print(ray.get_runtime_context().gcs_address)")
    try:
        ray_executor.ensure_ray(num_cpus=1)
        ours = ray.get_runtime_context().gcs_address
        theirs = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[2],
                                capture_output=True, text=True, timeout=120, check=True).stdout.split()[-1]
    finally:
        ray_executor.shutdown()
    assert theirs != ours


def test_ray_worker_processes_start_without_torch(tmp_path: Path, monkeypatch) -> None:
    """The setup hook runs in every process Ray starts (Train controller, data-stage task workers): it
    must not import torch, which cost each of them ~5.6 s and ~560 MB on 2 cores, and fixed torch's
    thread count before Ray set OMP_NUM_THREADS to the worker's CPUs."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # Ray sets it per worker only when unset

    def worker_state() -> tuple[bool, bool, str | None]:  # local: pickled by value, imports nothing of ours
        import logging
        import os
        import sys
        return ("torch" in sys.modules, logging.getLogger().level == logging.INFO, os.environ.get("OMP_NUM_THREADS"))

    try:
        ray_executor.ensure_ray(num_cpus=1)
        torch_loaded, hook_ran, omp = ray.get(ray.remote(num_cpus=1)(worker_state).remote())
    finally:
        ray_executor.shutdown()
    assert hook_ran  # the hook did run there (it sets the root logger to INFO)
    assert not torch_loaded
    assert omp == "1"
