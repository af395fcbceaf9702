"""Pairwise judging: both orders cancel a position-biased judge, hand-computed win rates, Bradley-Terry
against its closed form and its likelihood equations, and the OpenAI-compatible judge against real
HTTP servers on 127.0.0.1 (one that answers, one too slow, one that is not there)."""

from __future__ import annotations

import doctest
import json
import math
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stages import pairwise
from stages.pairwise import JudgeError, OpenAIJudge, bradley_terry, compare, elo

# --- compare --------------------------------------------------------------------------------------


def always_a(prompt: str, answer_a: str, answer_b: str) -> str:
    return "A"


def longer_else_a(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the longer answer; at equal length it falls back on position and says "A"."""
    if len(answer_a) == len(answer_b):
        return "A"
    return "A" if len(answer_a) > len(answer_b) else "B"


PROMPTS = ["p0", "p1", "p2", "p3"]
CHALLENGER = ["long answer", "longer one", "x", "same"]
CHAMPION = ["short", "short", "much longer", "four"]


def test_position_biased_judge_cancels_out() -> None:
    result = compare(PROMPTS, CHALLENGER, CHAMPION, always_a)
    assert result.win_rate == 0.5
    assert result.consistency == 0.0
    assert [r["value"] for r in result.rows] == [0.5] * 4
    low, high = result.interval
    assert low < 0.5 < high


def test_length_loving_judge_hand_computed() -> None:
    # p0, p1: challenger longer -> wins both orders (1); p2: shorter -> loses both (0);
    # p3: equal length -> "A" both times, one win one loss (0.5), inconsistent.
    result = compare(PROMPTS, CHALLENGER, CHAMPION, longer_else_a, items=["a", "b", "c", "d"])
    assert result.win_rate == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert result.consistency == pytest.approx(3 / 4)
    assert [(r["item"], r["value"], r["consistent"]) for r in result.rows] == [
        ("a", 1.0, True), ("b", 1.0, True), ("c", 0.0, True), ("d", 0.5, False)]
    assert result.rows[2]["challenger_as_a"] == "B" and result.rows[2]["challenger_as_b"] == "A"
    assert result.interval == pytest.approx(pairwise.wilson_interval(0.625, 4))
    assert result.metrics()["eval/pairwise/win_rate"] == pytest.approx(0.625)


def test_each_prompt_is_judged_in_both_orders_with_its_own_answers() -> None:
    seen: list[tuple[str, str, str]] = []

    def recording(prompt: str, answer_a: str, answer_b: str) -> str:
        seen.append((prompt, answer_a, answer_b))
        return "tie"

    result = compare(["p", "q"], ["c-p", "c-q"], ["o-p", "o-q"], recording, max_workers=2)
    assert sorted(seen) == sorted([("p", "c-p", "o-p"), ("p", "o-p", "c-p"),
                                   ("q", "c-q", "o-q"), ("q", "o-q", "c-q")])
    assert result.win_rate == 0.5 and result.consistency == 1.0


def test_compare_rejects_mismatched_inputs_and_bad_verdicts() -> None:
    with pytest.raises(ValueError, match="same non-zero number"):
        compare(["p", "q"], ["a"], ["b", "c"], always_a)
    with pytest.raises(JudgeError, match="'maybe'"):
        compare(["p"], ["a"], ["b"], lambda *_: "maybe")


def test_wilson_interval_contains_the_rate_and_narrows_with_n() -> None:
    small, large = pairwise.wilson_interval(0.7, 10), pairwise.wilson_interval(0.7, 1000)
    assert small[0] < large[0] < 0.7 < large[1] < small[1]


# --- Bradley-Terry and Elo ----------------------------------------------------------------------


def test_bradley_terry_two_players_closed_form() -> None:
    ratings = bradley_terry([("A", "B", 1.0), ("B", "A", 0.0), ("A", "B", 1.0), ("A", "B", 0.0)])
    # A wins 3 of 4: p = 0.75 = s_A / (s_A + s_B), so s_A / s_B = 3.
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(3), abs=1e-6)  # 190.85
    assert (ratings["A"] + ratings["B"]) / 2 == pytest.approx(1000.0)


def test_bradley_terry_ties_are_half_wins() -> None:
    ratings = bradley_terry([("A", "B", 0.5), ("A", "B", 1.0)])  # A: 1.5 of 2 -> 3:1 odds again
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(3), abs=1e-6)


def _league() -> list[tuple[str, str, float]]:
    rng = random.Random(0)
    true = {"a": 2.0, "b": 1.0, "c": 0.5, "d": 0.25}
    games = []
    for _ in range(400):
        i, j = rng.sample(sorted(true), 2)
        roll = rng.random()
        p_i = true[i] / (true[i] + true[j])
        games.append((i, j, 1.0 if roll < p_i - 0.05 else 0.5 if roll < p_i + 0.05 else 0.0))
    return games


def test_bradley_terry_solves_its_likelihood_equations_in_any_order() -> None:
    games = _league()
    ratings = bradley_terry(games)
    shuffled = games[:]
    random.Random(1).shuffle(shuffled)
    swapped = [(j, i, 1.0 - s) for i, j, s in shuffled]  # the same games, told from the other side
    for other in (bradley_terry(shuffled), bradley_terry(swapped)):
        assert other == pytest.approx(ratings, abs=1e-6)
    # At the maximum-likelihood point each player's expected score equals its actual score.
    strength = {p: 10 ** (r / 400) for p, r in ratings.items()}
    for player in ratings:
        actual = expected = 0.0
        for i, j, s in games:
            if player in (i, j):
                other = j if player == i else i
                actual += s if player == i else 1.0 - s
                expected += strength[player] / (strength[player] + strength[other])
        assert expected == pytest.approx(actual, abs=1e-6)
    assert sum(ratings.values()) / len(ratings) == pytest.approx(1000.0)
    assert sorted(ratings, key=ratings.get, reverse=True) == ["a", "b", "c", "d"]


def test_bradley_terry_unbeaten_player_needs_a_prior() -> None:
    games = [("A", "B", 1.0)] * 3
    with pytest.raises(ValueError, match="unbounded"):
        bradley_terry(games)
    ratings = bradley_terry(games, prior=1.0)
    assert all(math.isfinite(r) for r in ratings.values()) and ratings["A"] > ratings["B"]


def test_elo_is_sequential_and_conserves_points() -> None:
    ratings = elo([("a", "b", 1.0), ("a", "b", 1.0)], k=32)
    # second game: a at 1016, b at 984 -> expected 1 / (1 + 10^(-32/400)) for a
    expected = 1 / (1 + 10 ** (-32 / 400))
    assert ratings["a"] == pytest.approx(1016 + 32 * (1 - expected))
    assert ratings["a"] + ratings["b"] == pytest.approx(2000.0)


def test_pairwise_doctest() -> None:
    result = doctest.testmod(pairwise)
    assert result.attempted > 0 and result.failed == 0


# --- OpenAIJudge against real servers -------------------------------------------------------------


class _Server:
    """A stdlib HTTP server on 127.0.0.1 in a thread, serving /v1/chat/completions."""

    def __init__(self, reply: str, delay_s: float = 0.0) -> None:
        self.reply, self.delay_s, self.requests = reply, delay_s, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body,
                                       "auth": self.headers.get("Authorization")})
                time.sleep(outer.delay_s)
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                payload = json.dumps({"choices": [{"index": 0, "message": {
                    "role": "assistant", "content": outer.reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up at its timeout: that is the test

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # a handler still sleeping must not hold up shutdown
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request) -> Iterator[_Server]:
    reply, delay_s = request.param
    srv = _Server(reply, delay_s)
    yield srv
    srv.close()


@pytest.mark.parametrize("server", [("Answer B is correct, A is not. [[B]]", 0.0)], indirect=True)
def test_openai_judge_asks_the_endpoint_and_parses_its_verdict(server: _Server) -> None:
    judge = OpenAIJudge(server.base_url, "judge-model", api_key="secret")
    assert judge("What is 2+2?", "5", "4") == "B"
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer secret"
    body = request["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    user = body["messages"][-1]["content"]
    assert "What is 2+2?" in user and user.index("[Answer A]\n5") < user.index("[Answer B]\n4")
    # used through compare: the canned "B" twice is a position bias, and cancels
    result = compare(["What is 2+2?"], ["4"], ["5"], judge)
    assert result.win_rate == 0.5 and result.consistency == 0.0


@pytest.mark.parametrize("server", [("I cannot decide.", 0.0)], indirect=True)
def test_openai_judge_reply_without_verdict_is_an_error(server: _Server) -> None:
    with pytest.raises(JudgeError, match="gave no verdict"):
        OpenAIJudge(server.base_url, "m")("p", "a", "b")


@pytest.mark.parametrize("server", [("[[A]]", 2.0)], indirect=True)
def test_openai_judge_timeout_names_url_and_timeout(server: _Server) -> None:
    judge = OpenAIJudge(server.base_url, "m", timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(JudgeError) as err:
        judge("p", "a", "b")
    assert time.monotonic() - started < 1.5  # gave up at the timeout, did not wait for the reply
    assert judge.url in str(err.value) and "0.3 s" in str(err.value)


def test_openai_judge_unreachable_names_url() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1/", "m", timeout_s=2)
    with pytest.raises(JudgeError, match=f"http://127.0.0.1:{port}/v1/chat/completions is unreachable"):
        judge("p", "a", "b")
