"""Serving for real: vLLM from `.venv-serving` behind the router, following `champion` in a real MLflow.

The `openai` client talks to the router over loopback; the alias is moved by hand through
`MlflowClient` (as a person would in the MLflow UI) and back by `rollback`, under a bounded
concurrent load that must see zero failed requests. The checkpoints are two tiny randomly
pretrained models (a few steps, different seeds), which is all serving needs: their answers differ.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from flows import cli
from flows.serving import served_version
from infra import services
from infra.settings import load_settings
from infra.vllm_server import ServingConfig, ServingEnvError, VLLMServer, check_serving_env
from registry import gate, models
from tests.conftest import tiny_pretrained_checkpoints

NAME = "flywheel-serving-test"
SERVING_PYTHON = ServingConfig().python
needs_vllm = pytest.mark.skipif(not SERVING_PYTHON.is_file() and not os.environ.get("CI"),
                                reason=f"no serving environment at {SERVING_PYTHON} (make serving-env)")


# ----------------------------------------------------------------------------- fast: bad input


def test_missing_serving_env_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(ServingEnvError, match=r"does not exist; build it with `make serving-env`"):
        check_serving_env(tmp_path / "nope" / "python")


def test_checkpoint_without_tokenizer_is_refused_before_vllm_starts(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        VLLMServer.start(tmp_path, version="1", served_name=NAME, port=1, cfg=ServingConfig(), log_dir=tmp_path)


def test_port_in_use_is_named(tmp_path):
    with socket.socket() as sock:
        sock.bind((services.HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(OSError, match=f"port {port} on {services.HOST} is in use"):
            services.check_port_free(port)


def test_serve_without_a_champion_says_so(services, capsys):
    assert cli.main(["serve", "--name", "no-such-model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0]


# ----------------------------------------------------------------------------- the real stack


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Two tiny models pretrained a few steps from different seeds: real text, different answers."""
    return tiny_pretrained_checkpoints(tmp_path_factory.mktemp("serving-ckpts"))


@pytest.fixture(scope="module")
def registry(services, checkpoints) -> tuple[MlflowClient, list[str]]:
    """v1 (champion, through the gate) and v2 registered in the session's real MLflow server."""
    client = MlflowClient(services["mlflow"], services["mlflow"])
    experiment = client.create_experiment(f"serving-test-{time.time_ns()}")
    versions = []
    for path in checkpoints:
        run = client.create_run(experiment)
        versions.append(models.register_checkpoint(client, NAME, path, run.info.run_id, tags={}))
        client.set_terminated(run.info.run_id)
    first = gate.paired_verdict(gate.GateSpec("eval/test/accuracy"), 1.0, {"q": 1.0}, None)
    assert models.promote_if_passed(client, NAME, versions[0], [first], expected=None)
    return client, versions


@pytest.fixture(scope="module")
def base_url(registry):
    if not SERVING_PYTHON.is_file():
        pytest.fail(f"CI must build the serving environment ({SERVING_PYTHON}); `make test` does")
    url = services.up_serving(NAME, timeout=600)
    yield url
    services.down(names=("serving",))


def _openai(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


@needs_vllm
@pytest.mark.serving
@pytest.mark.slow
def test_openai_client_chat_stream_stop_n(base_url, registry):
    _, (v1, _) = registry
    client = _openai(base_url)
    assert [m.id for m in client.models.list().data] == [NAME]
    messages = [{"role": "user", "content": "Sam has 3 apples and gets 4 more. How many apples?"}]

    raw = client.chat.completions.with_raw_response.create(model=NAME, messages=messages, max_tokens=12,
                                                           temperature=0)
    assert raw.headers["x-model-version"] == v1
    greedy = raw.parse()
    text = greedy.choices[0].message.content
    assert text and greedy.usage.completion_tokens <= 12

    with client.chat.completions.with_streaming_response.create(
            model=NAME, messages=messages, max_tokens=12, temperature=0, stream=True) as stream:
        assert stream.headers["x-model-version"] == v1
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream.parse() if chunk.choices)
    assert streamed == text  # greedy: the stream is the same answer, piece by piece

    assert len(text) >= 2, text
    cut = text[len(text) // 2]  # a stop string from the answer itself: vLLM must cut right before it
    stopped = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, stop=[cut])
    assert stopped.choices[0].message.content == text[: text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"

    several = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=1.0,
                                             top_p=0.9, seed=7, n=3, extra_body={"top_k": 50})
    assert len(several.choices) == 3 and {c.index for c in several.choices} == {0, 1, 2}
    again = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=1.0,
                                           top_p=0.9, seed=7, n=3, extra_body={"top_k": 50})
    assert [c.message.content for c in again.choices] == [c.message.content for c in several.choices]  # seed

    completion = client.completions.with_raw_response.create(model=NAME, prompt="The module", max_tokens=4)
    assert completion.headers["x-model-version"] == v1 and completion.parse().choices[0].text is not None

    log = load_settings().home / "serving" / "logs" / "requests.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    chat = [r for r in records if r["path"] == "/v1/chat/completions" and r["stream"]]
    assert chat and chat[-1]["model_version"] == v1 and chat[-1]["response"] == text
    assert chat[-1]["prompt"] == messages and chat[-1]["latency_s"] > 0


class Load:
    """A bounded concurrent load on the router: `workers` loops of short chat requests, half streamed."""

    def __init__(self, url: str, workers: int = 4) -> None:
        self.url, self.stop, self.results = url, threading.Event(), []
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(workers)]

    def _loop(self, i: int) -> None:
        with httpx.Client(timeout=120) as http:
            for n in range(10_000):  # bounded, and stopped long before by the test
                if self.stop.is_set():
                    return
                body = {"model": NAME, "messages": [{"role": "user", "content": f"hello {i} {n}"}],
                        "max_tokens": 6, "stream": n % 2 == 0}
                started = time.monotonic()
                try:
                    r = http.post(f"{self.url}/chat/completions", json=body)
                    ok = r.status_code == 200 and (not body["stream"] or "[DONE]" in r.text)
                    self.results.append((started, ok, r.headers.get("x-model-version"), r.status_code))
                except httpx.HTTPError as err:
                    self.results.append((started, False, None, repr(err)))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


def _wait_for(url: str, version: str, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while served_version(url) != version:
        assert time.monotonic() - t0 < timeout, f"serving did not switch to v{version} in {timeout} s"
        time.sleep(0.5)
    return time.monotonic()


@needs_vllm
@pytest.mark.serving
@pytest.mark.slow
def test_hand_move_and_rollback_switch_with_zero_failed_requests(base_url, registry):
    client, (v1, v2) = registry
    assert served_version(base_url) == v1
    with Load(base_url) as load:
        time.sleep(2)
        moved = time.monotonic()
        client.set_registered_model_alias(NAME, "champion", v2)  # by hand, as in the MLflow UI
        switched = _wait_for(base_url, v2)
        time.sleep(2)
    failures = [r for r in load.results if not r[1]]
    assert not failures, failures[:5]
    assert {r[2] for r in load.results} == {v1, v2}
    assert all(r[2] == v2 for r in load.results if r[0] > switched)  # nothing old after the switch
    print(f"switch: {switched - moved:.1f} s from alias move to v{v2} serving, {len(load.results)} requests, 0 failed")

    history = models.champion_history(client, NAME)
    assert history[-1].action == "outside" and (history[-1].from_version, history[-1].to_version) == (v1, v2)

    with Load(base_url) as load:
        assert models.rollback(client, NAME) == v1
        switched = _wait_for(base_url, v1)
        time.sleep(2)
    assert not [r for r in load.results if not r[1]]
    assert all(r[2] == v1 for r in load.results if r[0] > switched)
    status = httpx.get(base_url.removesuffix("/v1") + "/status").json()
    assert [(s["from"], s["to"]) for s in status["switches"]] == [(None, v1), (v1, v2), (v2, v1)]


@needs_vllm
@pytest.mark.serving
@pytest.mark.slow
def test_queue_fill_takes_the_champions_answers_from_serving(base_url, registry, tmp_path, monkeypatch):
    from flows.queue import queue_fill_flow
    from ui import store as st

    client, versions = registry
    champion = models.champion_version(client, NAME)
    monkeypatch.setenv("FLYWHEEL_LABELS_DB", f"sqlite:///{tmp_path / 'labels.db'}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tom has 5 pens and buys 2 more. How many pens?\nWhat is 12 + 30?\nName a colour.\n")
    result = queue_fill_flow(name=NAME, prompts_file=str(prompts), overrides=["queue.max_new_tokens=8"])
    assert result["champion_via"] == "serving" and result["champion"] == champion
    assert result["challenger"] == next(v for v in versions if v != champion)
    store = st.open_store()
    with store.session() as s:
        items = s.query(st.Item).all()
    assert len(items) == result["queued"] >= 1
    assert {(it.model_a, it.model_b) for it in items} == {(f"v{champion}", f"v{result['challenger']}")}
    store.engine.dispose()
    # The router logged those requests as the platform's own: the next fill does not sample them back.
    from flows.prompts import logged_prompts, serving_log_files

    logs = serving_log_files(load_settings().home)
    records = [json.loads(line) for f in logs for line in f.read_text().splitlines()]
    assert sum(r.get("client") == "queue-fill" for r in records) >= 3
    asked = [p if isinstance(p, str) else p[-1]["content"] for p in logged_prompts(logs)]
    assert not set(prompts.read_text().splitlines()) & set(asked)


@needs_vllm
@pytest.mark.serving
@pytest.mark.slow
def test_api_docs_open_in_a_browser_through_the_router(base_url, browser):
    from tests.conftest import screenshot

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    try:
        page.goto(base_url.removesuffix("/v1") + "/docs", timeout=60_000)
        page.get_by_text("/v1/chat/completions").first.wait_for(timeout=60_000)  # Swagger, served offline
        screenshot(page, "service-pages/serving-docs", full_page=False)  # the whole API is 24,000 px tall
    finally:
        context.close()
