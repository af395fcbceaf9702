"""GRPO rollouts through a real vLLM server (`.venv-serving`), the policy's LoRA adapter hot-loaded.

Fast: the HTTP contract against a stub server (choice order, the cut after the first stop token,
the unload-then-load of an adapter name, errors that say what to fix). Slow, with the serving
environment: one server on the tiny SFT checkpoint with `--enable-lora` and runtime LoRA updating: greedy samples
over HTTP equal in-process greedy `generate` (base model, and a hot-loaded trained adapter against
its merged checkpoint); two GRPO steps with `rollout_url` load their adapter into the server and
train on token ids that decode to the server's texts.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
from tests.stages.conftest import (LINEAGE, corpus, pretrained, quiet_train, sft_trained,  # noqa: F401
                                   tokenizer_dir, tokens)

SERVING_PYTHON = ServingConfig().python
BASE_NAME = "flywheel-sft"


def needs_vllm(test):
    for mark in (pytest.mark.slow, pytest.mark.serving,
                 pytest.mark.skipif(not SERVING_PYTHON.is_file() and not os.environ.get("CI"),
                                    reason=f"no serving environment at {SERVING_PYTHON} (make serving-env)")):
        test = mark(test)
    return test


# ----------------------------------------------------------------------------- fast: a stub server

EOS = 2


class CharTokenizer:
    """One token per character (ord), eos = 2: enough to check ids go in and come out unchanged."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == EOS))


@pytest.fixture
def stub():
    """A stand-in for vLLM's OpenAI server: records every request, answers as `replies` say."""
    requests: list[tuple[str, dict]] = []
    replies: dict[str, tuple[int, dict | str]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.do_POST()

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            requests.append((self.path, body))
            status, payload = replies.get(self.path, (200, "Success"))
            if callable(payload):
                payload = payload(body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", requests, replies
    httpd.shutdown()
    thread.join(timeout=10)


def test_sample_via_server_sends_token_ids_and_cuts_after_the_first_stop(stub) -> None:
    url, requests, replies = stub

    def complete(body):  # two prompts x n=2, answered out of order; a stop token mid-row is cut after
        rows = {0: [ord("a"), EOS, ord("x")], 1: [ord("b")], 2: [ord("c"), ord("d"), EOS], 3: [EOS]}
        return {"choices": [{"index": i, "text": CharTokenizer().decode(rows[i][: (rows[i] + [EOS]).index(EOS)]),
                             "token_ids": rows[i]} for i in (3, 1, 2, 0)]}

    replies["/v1/completions"] = (200, complete)
    out = vllm_rollout.sample_via_server(url, "adapter-1", CharTokenizer(), ["hi", "yo"], n=2, max_new_tokens=3,
                                         temperature=0.7, seed=11, stop_ids=[EOS, 1])
    (path, body), = requests
    assert path == "/v1/completions"
    assert body["prompt"] == [[104, 105], [121, 111]] and body["model"] == "adapter-1"
    assert (body["n"], body["max_tokens"], body["temperature"], body["seed"]) == (2, 3, 0.7, 11)
    assert body["return_token_ids"] is True and body["stop_token_ids"] == [EOS, 1]
    assert (body["top_k"], body["top_p"]) == (0, 1.0)  # no truncation, as in-process sampling
    assert out.prompts == [[104, 105], [104, 105], [121, 111], [121, 111]]
    assert out.completions == [[ord("a"), EOS], [ord("b")], [ord("c"), ord("d"), EOS], [EOS]]
    assert out.texts == ["a", "b", "cd", ""]


def test_sample_via_server_errors_name_the_server_and_the_fix(stub) -> None:
    url, _, replies = stub
    replies["/v1/completions"] = (404, {"message": "The model `nope` does not exist."})
    with pytest.raises(vllm_rollout.RolloutServerError, match=r"answered 404.*nope"):
        vllm_rollout.sample_via_server(url, "nope", CharTokenizer(), ["hi"], n=1, max_new_tokens=2,
                                       temperature=0.0, seed=0)
    replies["/v1/completions"] = (200, {"choices": [{"index": 0, "text": "a"}]})
    with pytest.raises(vllm_rollout.RolloutServerError, match="no token_ids"):
        vllm_rollout.sample_via_server(url, "m", CharTokenizer(), ["hi"], n=1, max_new_tokens=2,
                                       temperature=0.0, seed=0)
    with pytest.raises(vllm_rollout.RolloutServerError, match=r"grpo\.rollout_url: .* did not answer"):
        vllm_rollout.sample_via_server(f"http://127.0.0.1:{_free_port()}", "m", CharTokenizer(), ["hi"], n=1,
                                       max_new_tokens=2, temperature=0.0, seed=0)


def test_load_adapter_unloads_that_name_first_and_says_how_to_enable_lora(stub, tmp_path: Path) -> None:
    url, requests, replies = stub
    replies["/v1/unload_lora_adapter"] = (404, {"message": "not found"})  # nothing loaded yet: fine
    vllm_rollout.load_adapter(url, "grpo-policy", tmp_path / "3")
    assert requests == [("/v1/unload_lora_adapter", {"lora_name": "grpo-policy"}),
                        ("/v1/load_lora_adapter", {"lora_name": "grpo-policy", "lora_path": str(tmp_path / "3")})]
    replies["/v1/load_lora_adapter"] = (404, {"message": "Not Found"})
    with pytest.raises(vllm_rollout.RolloutServerError, match=r"answered 404.*--enable-lora.*RUNTIME_LORA_UPDATING"):
        vllm_rollout.load_adapter(url, "grpo-policy", tmp_path / "4")


def test_grpo_refuses_a_server_that_does_not_serve_rollout_model(stub, sft_trained, corpus,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    url, requests, replies = stub
    replies["/v1/models"] = (200, {"data": [{"id": "someone-else"}]})
    cfg = GRPOConfig(dataset=corpus, policy=sft_trained.checkpoint, output_dir=tmp_path, group_size=2,
                     prompts_per_step=1, lora=LoraConfig(r=4), rollout_url=url, rollout_model=BASE_NAME,
                     train=quiet_train(max_steps=1, checkpoint_every=1))
    with pytest.raises(ValueError, match=rf"grpo\.rollout_model='{BASE_NAME}' is not served at .*someone-else.*"
                                         rf"--served-model-name {BASE_NAME}"):
        grpo.run(cfg)
    assert [path for path, _ in requests] == ["/v1/models"]  # nothing loaded, nothing sampled


# ----------------------------------------------------------------------------- the real server


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


@needs_vllm
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


@needs_vllm
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
