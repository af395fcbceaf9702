"""`compare` against the session's real Prefect and MLflow servers and a real judge over HTTP.

The judge is a stdlib HTTP server on 127.0.0.1 that reads the two answers out of the prompt
`OpenAIJudge` sends and prefers the longer one, so every verdict, the win rate and the ratings can
be computed by hand from the answers recorded in `comparisons.jsonl`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows import cli
from flows import compare as cmp
from flows import prompts
from registry import gate, models
from stages import collect, pairwise
from stages.chat import load_problems
from stages.checkpoint import load_model, load_tokenizer
from stages.collect import CollectConfig
from stages.rollout import sample
from tests.conftest import tiny_pretrained_checkpoints

NAME = f"flywheel-compare-test-{time.time_ns()}"  # a model of its own: no other test's pairwise runs
MAX_NEW_TOKENS = 16
LOGGED = [  # what infra/router.py writes, one dict per request
    {"path": "/v1/chat/completions", "status": 200, "prompt": [{"role": "user", "content": "Name a colour."}]},
    {"path": "/v1/completions", "status": 200, "prompt": "The module"},
    {"path": "/v1/chat/completions", "status": 200, "prompt": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]},
    {"path": "/v1/chat/completions", "status": 200, "prompt": [{"role": "user", "content": "Name a colour."}]},
    {"path": "/v1/models", "status": 200, "prompt": None},
    {"path": "/v1/chat/completions", "status": 200, "prompt": [  # nothing left for the model to answer
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
]
ROTATED = {"path": "/v1/chat/completions", "status": 200, "prompt": [{"role": "user", "content": "Count to 3."}]}


# ----------------------------------------------------------------------------- no servers


def test_prompts_file_jsonl_text_and_the_bad_line_named(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "What is 2+2?"}\n\n{"prompt": [{"role": "user", "content": "Hi"}], "id": 7}\n')
    assert prompts.load_prompts_file(good) == ["What is 2+2?", [{"role": "user", "content": "Hi"}]]
    text = tmp_path / "p.txt"
    text.write_text("first question\n\n  second question  \n")
    assert prompts.load_prompts_file(text) == ["first question", "second question"]
    for third_line in ("{not json", '{"text": "no prompt field"}', '{"prompt": ""}', '["a list"]',
                       '{"prompt": [{"role": "user"}]}', '{"prompt": [{"role": "assistant", "content": "x"}]}'):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "a"}\n\n' + third_line + "\n")
        with pytest.raises(prompts.PromptsFileError, match=rf"^{re.escape(str(bad))}:3: ") as err:
            prompts.load_prompts_file(bad)
        assert "\n" not in str(err.value)


def test_logged_prompts_are_distinct_user_prompts_oldest_log_first(tmp_path: Path) -> None:
    # ...and never the platform's own requests (the queue fill asking the champion marks them `client`).
    logs = tmp_path / "serving" / "logs"
    logs.mkdir(parents=True)
    own = {"path": "/v1/chat/completions", "status": 200, "client": "queue-fill", "prompt": "asked by the platform"}
    (logs / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*LOGGED, own]) + "{cut by rotat\n")
    (logs / "requests.jsonl.2").write_text(json.dumps(LOGGED[1]) + "\n")
    (logs / "requests.jsonl.1").write_text(json.dumps(ROTATED) + "\n")
    files = prompts.serving_log_files(tmp_path)
    assert [f.name for f in files] == ["requests.jsonl.2", "requests.jsonl.1", "requests.jsonl"]
    assert prompts.logged_prompts(files) == ["The module", ROTATED["prompt"], LOGGED[0]["prompt"], LOGGED[2]["prompt"]]


def test_a_failed_judge_call_stops_the_queued_ones() -> None:
    calls = []

    def dead_judge(prompt: str, a: str, b: str) -> str:
        calls.append(prompt)
        raise pairwise.JudgeError("judge at http://x/v1/chat/completions is unreachable")

    with pytest.raises(pairwise.JudgeError, match="unreachable"):
        pairwise.compare([f"p{i}" for i in range(10)], ["a"] * 10, ["b"] * 10, cmp.FailFastJudge(dead_judge))
    assert calls == ["p0"]  # not 20 calls (each a full timeout against a real dead judge)


# ----------------------------------------------------------------------------- a real judge over HTTP


def _answers_in(judge_prompt: str) -> tuple[str, str, str]:
    """(prompt, answer A, answer B) out of pairwise.JUDGE_USER as OpenAIJudge formats it."""
    head, answer_b = judge_prompt.rsplit("\n\n[Answer B]\n", 1)
    head, answer_a = head.rsplit("\n\n[Answer A]\n", 1)
    return head.removeprefix("[User prompt]\n"), answer_a, answer_b


class LongerAnswerJudge:
    """/v1/chat/completions on 127.0.0.1 that prefers the longer answer (tie when equally long)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s, self.seen = delay_s, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(outer.delay_s)
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                prompt, a, b = _answers_in(body["messages"][-1]["content"])
                outer.seen.append((prompt, a, b))
                verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
                payload = json.dumps({"choices": [{"index": 0, "message": {
                    "role": "assistant", "content": f"The longer one. [[{verdict}]]"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up at its timeout

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # a handler still sleeping must not hold up shutdown
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def judge() -> Iterator[LongerAnswerJudge]:
    server = LongerAnswerJudge()
    yield server
    server.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare-data")
    return collect.run(CollectConfig(output_dir=root / "collect", max_builtin_chars=40_000,
                                     arithmetic_problems=100)).dataset


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory) -> list[Path]:
    """Two tiny models pretrained a few steps from different seeds: real text, different answers."""
    return tiny_pretrained_checkpoints(tmp_path_factory.mktemp("compare-ckpts"), corpus, steps=4)


@pytest.fixture(scope="module")
def registry(services, checkpoints) -> MlflowClient:
    """v1 (champion, through the gate) and v2 (challenger, the newest) in the session's real MLflow."""
    client = MlflowClient(services["mlflow"], services["mlflow"])
    experiment = client.create_experiment(f"compare-test-{time.time_ns()}")
    for path in checkpoints:
        run = client.create_run(experiment)
        models.register_checkpoint(client, NAME, path, run.info.run_id, tags={})
        client.set_terminated(run.info.run_id)
    first = gate.paired_verdict(gate.GateSpec("eval/test/accuracy"), 1.0, {"q": 1.0}, None)
    assert models.promote_if_passed(client, NAME, "1", [first], expected=None)
    return client


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A state root whose serving logs hold LOGGED and ROTATED (the session's own logs stay untouched)."""
    root = tmp_path_factory.mktemp("compare-home")
    logs = root / "serving" / "logs"
    logs.mkdir(parents=True)
    (logs / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LOGGED))
    (logs / "requests.jsonl.1").write_text(json.dumps(ROTATED) + "\n")
    return root


def _rows(client: MlflowClient, run_id: str, dst: Path) -> list[dict]:
    path = client.download_artifacts(run_id, "comparisons.jsonl", str(dst))
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _hand_score(row: dict) -> float:
    ch, cp = len(row["challenger_answer"]), len(row["champion_answer"])
    return 1.0 if ch > cp else 0.0 if ch < cp else 0.5


def _ratings_tags(client: MlflowClient) -> dict[str, float]:
    tags = client.get_registered_model(NAME).tags
    return {k.removeprefix("rating.v"): float(v) for k, v in tags.items() if k.startswith("rating.v")}


@pytest.fixture(scope="module")
def first(registry, judge, home, corpus) -> dict:
    """challenger (v2) vs champion (v1) by alias, prompts from the serving logs and the test split."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_HOME", str(home))
        return cmp.compare_versions(model_name=NAME, judge_url=judge.base_url, judge_model="longer", n=6,
                                    max_new_tokens=MAX_NEW_TOKENS, timeout_s=10, dataset=str(corpus))


def test_compare_judges_both_orders_and_records_run_rows_and_tags(first, registry, judge, checkpoints, corpus,
                                                                  tmp_path) -> None:
    client = registry
    assert (first["challenger"], first["champion"], first["n"]) == ("2", "1", 6)
    rows = _rows(client, first["run_id"], tmp_path)
    assert len(rows) == 6

    # 3 = n // 2 distinct logged user prompts, the rest from the arithmetic test split
    assert first["sources"] == {"serving_logs": 3, "arithmetic_test": 3}
    logged = [r["prompt"] for r in LOGGED[:3]] + [ROTATED["prompt"]]
    test_questions = {p.question for p in load_problems(corpus, "test")}
    for row in rows:
        assert row["prompt"] in logged if row["source"] == "serving_logs" else row["prompt"] in test_questions
    assert len({json.dumps(r["prompt"]) for r in rows}) == 6

    # answers: greedy, through each version's own chat template, v2's on the challenger side
    for key, checkpoint in (("champion_answer", checkpoints[0]), ("challenger_answer", checkpoints[1])):
        model, tok = load_model(checkpoint), load_tokenizer(checkpoint)
        texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str)
                                         else r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
        expected = sample(model, tok, texts, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0).texts
        assert [r[key] for r in rows] == expected
    assert any(r["challenger_answer"] != r["champion_answer"] for r in rows)

    # both orders reached the judge with the right answers, and each verdict is recorded
    for row in rows:
        prompt = prompts.judge_text(row["prompt"])
        ch, cp = row["challenger_answer"], row["champion_answer"]
        assert (prompt, ch, cp) in judge.seen and (prompt, cp, ch) in judge.seen
        longer = _hand_score(row)
        assert row["challenger_as_a"] == {1.0: "A", 0.0: "B", 0.5: "tie"}[longer]
        assert row["challenger_as_b"] == {1.0: "B", 0.0: "A", 0.5: "tie"}[longer]
        assert row["score"] == longer and row["consistent"]
    hand = sum(_hand_score(r) for r in rows) / len(rows)
    assert first["win_rate"] == pytest.approx(hand)
    assert first["interval"] == pytest.approx(pairwise.wilson_interval(hand, 6))

    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in ("stage", "model.name", "challenger.version", "champion.version",
                                           "judge.url", "judge.model")} == {
        "stage": "pairwise", "model.name": NAME, "challenger.version": "2", "champion.version": "1",
        "judge.url": judge.base_url + "/chat/completions", "judge.model": "longer"}
    assert run.data.metrics["eval/pairwise/win_rate"] == pytest.approx(hand)
    assert run.data.metrics["eval/pairwise/prompts"] == 6
    assert run.data.metrics["eval/pairwise/consistency"] == 1.0  # a length judge ignores the order
    assert float(client.get_model_version(NAME, "2").tags["pairwise.win_rate.vs_v1"]) == pytest.approx(hand)
    png = Path(client.download_artifacts(first["run_id"], "ratings.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # ratings: Bradley-Terry over these rows; who won more prompts is rated higher
    expected = pairwise.bradley_terry([("2", "1", r["score"]) for r in rows], prior=cmp.RATING_PRIOR)
    assert _ratings_tags(client) == pytest.approx(expected, abs=0.051)
    # who won more prompts is rated higher; an even split (the tiny models' luck) rates them equal
    ratings = first["ratings"]
    if hand == 0.5:
        assert ratings["2"] == pytest.approx(ratings["1"])
    else:
        assert (ratings["2"] - ratings["1"]) * (hand - 0.5) > 0


def test_second_compare_accumulates_comparisons_into_ratings(first, registry, judge, tmp_path) -> None:
    client = registry
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is a dictionary?\n\nSam has 3 apples and gets 4 more. How many apples?\nSay hi.\n")
    second = cmp.compare_versions(model_name=NAME, challenger="1", champion="2", judge_url=judge.base_url,
                                  judge_model="longer", prompts_file=str(prompts), n=50,
                                  max_new_tokens=MAX_NEW_TOKENS, timeout_s=10)
    assert (second["challenger"], second["champion"], second["n"], second["sources"]) == ("1", "2", 3, {"file": 3})
    rows2 = _rows(client, second["run_id"], tmp_path / "second")
    assert [r["prompt"] for r in rows2] == [
        "What is a dictionary?", "Sam has 3 apples and gets 4 more. How many apples?", "Say hi."]
    assert second["win_rate"] == pytest.approx(sum(_hand_score(r) for r in rows2) / 3)
    assert float(client.get_model_version(NAME, "1").tags["pairwise.win_rate.vs_v2"]) == pytest.approx(
        second["win_rate"])

    rows1 = _rows(client, first["run_id"], tmp_path / "first")
    both = [(r["challenger_version"], r["champion_version"], r["score"]) for r in rows1 + rows2]
    expected = pairwise.bradley_terry(both, prior=cmp.RATING_PRIOR)
    assert second["ratings"] == pytest.approx(expected)
    assert _ratings_tags(client) == pytest.approx(expected, abs=0.051)
    alone = pairwise.bradley_terry([("1", "2", r["score"]) for r in rows2], prior=cmp.RATING_PRIOR)
    assert expected != pytest.approx(alone, abs=0.1)  # the first run's prompts are in there


# ----------------------------------------------------------------------------- the command line


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("flywheel compare:")]


def test_cli_prints_win_rate_and_ratings(first, registry, judge, tmp_path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Name a fruit."}\n{"prompt": [{"role": "user", "content": "Count to 2."}]}\n')
    assert cli.main(["compare", "--name", NAME, "--judge-url", judge.base_url, "--judge-model", "longer",
                     "--prompts", str(prompts), "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    out = capsys.readouterr().out
    assert f"{NAME} v2 vs v1 on 2 prompts (2 from file)" in out
    assert "win rate" in out and "consistency  1.000" in out
    ratings = _ratings_tags(registry)
    for version, rating in ratings.items():
        assert f"v{version}  {rating:8.1f}" in out


def test_cli_judge_timeout_is_one_line_naming_the_url(registry, tmp_path, capsys, monkeypatch) -> None:
    slow = LongerAnswerJudge(delay_s=3.0)
    monkeypatch.setenv("FLYWHEEL_JUDGE_URL", slow.base_url)  # the URL may come from the environment
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    try:
        rc = cli.main(["compare", "--name", NAME, "--judge-model", "m",
                       "--prompts", str(prompts), "--max-new-tokens", "4", "--timeout", "0.3"])
    finally:
        slow.close()
    assert rc == 1
    [line] = _error_lines(capsys)
    assert f"{slow.base_url}/chat/completions" in line and "0.3 s" in line


def test_cli_bad_prompts_line_is_one_line_naming_file_and_line(registry, judge, tmp_path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": 5}\n')
    assert cli.main(["compare", "--name", NAME, "--judge-url", judge.base_url, "--judge-model", "m",
                     "--prompts", str(prompts)]) == 1
    [line] = _error_lines(capsys)
    assert f"{prompts}:2:" in line


@pytest.mark.parametrize("argv, named", [(["--challenger", "99"], "'99'"), (["--champion", "nosuch"], "'nosuch'"),
                                         (["--challenger", "1", "--champion", "champion"], "both v1")])
def test_cli_unknown_or_same_version_is_one_line(registry, judge, argv, named, capsys) -> None:
    assert cli.main(["compare", "--name", NAME, "--judge-url", judge.base_url, "--judge-model", "m", *argv]) == 1
    [line] = _error_lines(capsys)
    assert named in line
