"""GRPO rollouts through a real vLLM server (`.venv-serving`), the policy's LoRA adapter hot-loaded.

One server on the tiny SFT checkpoint with `--enable-lora` and runtime LoRA updating: greedy samples
over HTTP equal in-process greedy `generate` (base model, and a hot-loaded trained adapter against
its merged checkpoint); two GRPO steps with `rollout_url` load their adapter into the server and
train on token ids that decode to the server's texts.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from infra.vllm_server import ServingConfig, VLLMServer
from stages import checkpoint as ckpt
from stages import grpo, vllm_rollout
from stages.chat import load_problems, prompt_text
from stages.grpo import GRPOConfig
from stages.lora import LoraConfig
from stages.rollout import sample
from stages.tracking import RecordingTracker
from tests.stages.conftest import LINEAGE, corpus, pretrained, quiet_train, sft_trained, tokenizer_dir  # noqa: F401

SERVING_PYTHON = ServingConfig().python
BASE_NAME = "flywheel-sft"
pytestmark = [
    pytest.mark.skipif(not SERVING_PYTHON.is_file() and not os.environ.get("CI"),
                       reason=f"no serving environment at {SERVING_PYTHON} (make serving-env)"),
    pytest.mark.serving, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(sft_trained, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """vLLM on the SFT checkpoint, LoRA adapters hot-loadable at run time; stopped by its PID."""
    if not SERVING_PYTHON.is_file():
        pytest.fail(f"CI must build the serving environment ({SERVING_PYTHON}); `make test` does")
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")  # VLLMServer passes the environment on
    cfg = ServingConfig(enforce_eager=True, extra_args=("--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"))
    backend = VLLMServer.start(sft_trained.checkpoint, version="sft", served_name=BASE_NAME, port=_free_port(),
                               cfg=cfg, log_dir=tmp_path_factory.mktemp("vllm-logs"))
    mp.undo()
    try:
        seconds = backend.wait_healthy(timeout=cfg.health_timeout_s)
        print(f"vLLM healthy after {seconds:.0f} s (pid {backend.proc.pid})")
        yield backend.url
    finally:
        backend.stop()
        assert backend.proc.poll() is not None, f"vLLM pid {backend.proc.pid} still running"


def _prompts(corpus: Path, tokenizer, k: int = 3) -> list[str]:  # noqa: F811
    return [prompt_text(tokenizer, p.question) for p in load_problems(corpus, "train")[:k]]


def _greedy_via_server(url: str, name: str, tokenizer, policy, prompts: list[str]):
    return vllm_rollout.sample_via_server(
        url, name, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0.0, seed=0,
        stop_ids=vllm_rollout.stop_token_ids(tokenizer, policy.generation_config.eos_token_id))


def test_greedy_rollout_over_http_equals_in_process_greedy(server, sft_trained, corpus) -> None:  # noqa: F811
    tokenizer = ckpt.load_tokenizer(sft_trained.checkpoint)
    model = ckpt.load_model(sft_trained.checkpoint).eval()
    prompts = _prompts(corpus, tokenizer)
    served = _greedy_via_server(server, BASE_NAME, tokenizer, model, prompts)
    local = sample(model, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0.0)
    assert served.prompts == local.prompts
    assert served.completions == local.completions
    assert served.texts == local.texts
    assert any(served.completions)


def test_grpo_with_rollout_url_hot_loads_its_adapter(server, sft_trained, corpus, tmp_path: Path,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = vllm_rollout.sample_via_server

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((args, kwargs, out))
        return out

    monkeypatch.setattr(vllm_rollout, "sample_via_server", spy)
    monkeypatch.setattr(grpo, "combined", lambda completions, **_: [len(c) / 10 for c in completions])
    cfg = GRPOConfig(dataset=corpus, policy=sft_trained.checkpoint, output_dir=tmp_path, group_size=4,
                     prompts_per_step=2, max_new_tokens=10, lora=LoraConfig(r=4, alpha=8), rollout_url=server,
                     rollout_model=BASE_NAME, lineage=LINEAGE,
                     train=quiet_train(max_steps=2, lr=3e-2, warmup_steps=0, checkpoint_every=1))
    tracker = RecordingTracker()
    result = grpo.run(cfg, tracker=tracker)

    assert len(seen) == 2 and all(args[1] == cfg.rollout_adapter for args, _, _ in seen)
    assert cfg.rollout_adapter in vllm_rollout.served_models(server)
    assert [p.name for p in (tmp_path / "rollout-adapter").iterdir()] == ["1"]  # only the latest kept
    tokenizer = ckpt.load_tokenizer(sft_trained.checkpoint)
    for _, _, samples in seen:
        assert len(samples.completions) == cfg.group_size * cfg.prompts_per_step
        assert [tokenizer.decode(c, skip_special_tokens=True) for c in samples.completions] == samples.texts
        assert all(0 < len(c) <= cfg.max_new_tokens for c in samples.completions)
    assert len(tracker.series("train/loss")) == 2 and tracker.series("rl/kl")[-1] > 0

    # The hot-loaded trained adapter answers like its merged checkpoint in-process.
    vllm_rollout.load_adapter(server, "grpo-final", result.checkpoint / ckpt.ADAPTER)
    merged = ckpt.load_model(result.checkpoint).eval()
    prompts = _prompts(corpus, tokenizer)
    served = _greedy_via_server(server, "grpo-final", tokenizer, merged, prompts)
    local = sample(merged, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0.0)
    assert served.completions == local.completions
    base = sample(ckpt.load_model(sft_trained.checkpoint).eval(), tokenizer, prompts, n=1, max_new_tokens=16,
                  temperature=0.0)
    print("the trained adapter changes greedy answers:", base.completions != local.completions)
