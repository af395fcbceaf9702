"""Challenger against champion on the same prompts, judged by a model, in both answer orders.

    from stages import pairwise
    judge = pairwise.OpenAIJudge("http://127.0.0.1:8000/v1", "judge-model")   # vLLM or any hosted model
    result = pairwise.compare(prompts, challenger_answers, champion_answers, judge)
    result.win_rate, result.interval, result.consistency, result.metrics()
    pairwise.bradley_terry([("sft-v3", "sft-v2", 1.0), ("sft-v2", "sft-v3", 0.5)])  # Elo-scale ratings

Why both orders: LLM judges favour a position (usually the first answer). Each prompt is judged
with the challenger as A and again as B, and its score is the mean of the two verdicts from the
challenger's side (win 1, tie 0.5, loss 0). A judge that always says "A" then scores every prompt
0.5, a win rate of exactly 0.5: position bias cancels instead of deciding the gate. A prompt is
*consistent* when the two verdicts name the same answer (or both tie); the consistency rate says
how much of the judge's opinion survived swapping the order.

Interval: Wilson score 95 % on the prompt scores with n = prompts. Wilson because it is
closed-form and deterministic (a gate gives the same answer twice), stays inside [0, 1] and keeps
its coverage at small n and near 0 or 1 where the normal interval fails. n counts prompts, not the
2n verdicts, because the two orders of one prompt are not independent draws. The scores are
fractional (0, 0.25, ..., 1), and a variable in [0, 1] with mean p has variance at most p(1 - p),
so the binomial interval is conservative for them: it is never narrower than the data warrant.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import httpx

Verdict = Literal["A", "B", "tie"]
Z_95 = 1.959963984540054

JUDGE_SYSTEM = (
    "You are an impartial judge. Compare two answers to the same user prompt and decide which one "
    "is more helpful, correct and clear. The order of the answers, their length and their style "
    "must not influence you. You may explain briefly, then end with your verdict in exactly this "
    "format: [[A]] if answer A is better, [[B]] if answer B is better, [[tie]] if they are equally good."
)
JUDGE_USER = "[User prompt]\n{prompt}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}"


class Judge(Protocol):
    def __call__(self, prompt: str, answer_a: str, answer_b: str) -> str:
        """"A", "B" or "tie"."""
        ...


class JudgeError(RuntimeError):
    """A judge that could not give a verdict: unreachable, too slow, or an unreadable reply."""


# --- parsing a judge's reply ------------------------------------------------------------------

_BRACKETED = re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE)
_LABELLED = re.compile(r"^\W*(?:final\s+)?(?:verdict|answer|winner)\s*[:=\-]\s*\W*(A|B|tie)\b",
                       re.IGNORECASE | re.MULTILINE)
_BARE = {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "equal": "tie",
         "answer a": "A", "answer b": "B", "assistant a": "A", "assistant b": "B"}


def parse_verdict(reply: str) -> Verdict | None:
    """The verdict in a judge's reply, or None when it does not contain a clear one.

    The last `[[...]]` wins (a judge that discusses "[[A]]" before deciding); then a labelled
    "Verdict: B" line; then a bare reply such as "tie" or "**A**".

    >>> parse_verdict("A is longer, but B is right. [[B]]"), parse_verdict("[[Tie]]")
    ('B', 'tie')
    >>> parse_verdict("Final verdict: A"), parse_verdict(" **b**."), parse_verdict("Draw")
    ('A', 'B', 'tie')
    >>> parse_verdict("Both answers have merit.") is None
    True
    """
    found = _BRACKETED.findall(reply)
    if not found:
        found = _LABELLED.findall(reply)
    if found:
        return _BARE[found[-1].lower()]
    return _BARE.get(re.sub(r"[\s*`'\".!]+", " ", reply).strip().lower())


# --- an OpenAI-compatible judge -----------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIJudge:
    """A model behind `POST {base_url}/chat/completions` (vLLM, or any OpenAI-compatible host).

    `base_url` is the API root, e.g. "http://127.0.0.1:8000/v1" (a full ".../chat/completions" URL
    is accepted too). Greedy decoding (temperature 0) so a verdict is reproducible.
    """

    base_url: str
    model: str
    timeout_s: float = 30.0
    api_key: str | None = None
    max_tokens: int = 512
    system_prompt: str = JUDGE_SYSTEM

    @property
    def url(self) -> str:
        root = self.base_url.rstrip("/")
        return root if root.endswith("/chat/completions") else root + "/chat/completions"

    def __call__(self, prompt: str, answer_a: str, answer_b: str) -> Verdict:
        body = {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": self.system_prompt},
                             {"role": "user", "content": JUDGE_USER.format(
                                 prompt=prompt, answer_a=answer_a, answer_b=answer_b)}]}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = httpx.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
        except httpx.TimeoutException as err:
            raise JudgeError(f"judge at {self.url} gave no answer within the {self.timeout_s} s "
                             f"timeout ({type(err).__name__})") from err
        except httpx.TransportError as err:
            raise JudgeError(f"judge at {self.url} is unreachable ({type(err).__name__}: {err}; "
                             f"timeout {self.timeout_s} s)") from err
        if response.status_code != 200:
            raise JudgeError(f"judge at {self.url} answered HTTP {response.status_code}: "
                             f"{response.text[:200]!r}")
        try:
            reply = response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise JudgeError(f"judge at {self.url} sent no chat completion: {response.text[:200]!r}") from err
        verdict = parse_verdict(reply)
        if verdict is None:
            raise JudgeError(f"judge at {self.url} gave no verdict ([[A]], [[B]] or [[tie]]) in "
                             f"{reply[-200:]!r}")
        return verdict


# --- comparing two models -----------------------------------------------------------------------

# The challenger's score for a verdict, by the position the challenger held.
_AS_A = {"A": 1.0, "tie": 0.5, "B": 0.0}
_AS_B = {"B": 1.0, "tie": 0.5, "A": 0.0}


@dataclass(frozen=True)
class PairwiseResult:
    win_rate: float                  # mean prompt score of the challenger (0.5: no difference)
    interval: tuple[float, float]    # Wilson 95 % on the prompt scores, n = prompts
    consistency: float               # share of prompts whose two verdicts agree once swapped back
    rows: list[dict] = field(repr=False)  # one per prompt: item, value, both verdicts, consistent

    @property
    def n(self) -> int:
        return len(self.rows)

    def metrics(self, name: str = "pairwise") -> dict[str, float]:
        """Headline numbers as `eval/<name>/...` metrics (the rows use `eval/<name>/win_rate`)."""
        low, high = self.interval
        return {f"eval/{name}/win_rate": self.win_rate, f"eval/{name}/win_rate_low": low,
                f"eval/{name}/win_rate_high": high, f"eval/{name}/consistency": self.consistency,
                f"eval/{name}/prompts": float(self.n)}


def compare(prompts: Sequence[str], challenger_answers: Sequence[str], champion_answers: Sequence[str],
            judge: Judge, *, items: Sequence[str] | None = None, max_workers: int = 1,
            name: str = "pairwise") -> PairwiseResult:
    """Judge every prompt twice (challenger as A, then as B) and score the challenger.

    `items` are the prompts' ids in the per-prompt rows (default "0", "1", ...) so a gate can pair
    them with other per-item scores; `max_workers` > 1 sends that many judge calls at once (a
    vLLM server batches them).

    >>> always_a = lambda prompt, a, b: "A"
    >>> r = compare(["p", "q"], ["x", "y"], ["z", "w"], always_a)
    >>> r.win_rate, r.consistency
    (0.5, 0.0)
    """
    n = len(prompts)
    if not n or len(challenger_answers) != n or len(champion_answers) != n:
        raise ValueError(f"need the same non-zero number of prompts ({n}), challenger answers "
                         f"({len(challenger_answers)}) and champion answers ({len(champion_answers)})")
    items = [str(i) for i in range(n)] if items is None else [str(i) for i in items]
    if len(items) != n or len(set(items)) != n:
        raise ValueError(f"items must be {n} distinct ids")
    calls = [(p, c, o) for p, c, o in zip(prompts, challenger_answers, champion_answers)]
    calls += [(p, o, c) for p, c, o in zip(prompts, challenger_answers, champion_answers)]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        verdicts = list(pool.map(lambda call: _checked(judge(*call)), calls))

    rows = []
    for i, item in enumerate(items):
        as_a, as_b = verdicts[i], verdicts[n + i]
        rows.append({"metric": f"eval/{name}/win_rate", "item": item,
                     "value": (_AS_A[as_a] + _AS_B[as_b]) / 2, "challenger_as_a": as_a,
                     "challenger_as_b": as_b, "consistent": _AS_A[as_a] == _AS_B[as_b]})
    win_rate = sum(r["value"] for r in rows) / n
    return PairwiseResult(win_rate=win_rate, interval=wilson_interval(win_rate, n),
                          consistency=sum(r["consistent"] for r in rows) / n, rows=rows)


def _checked(verdict: str) -> Verdict:
    if verdict not in _AS_A:
        raise JudgeError(f'a judge must return "A", "B" or "tie", got {verdict!r}')
    return verdict  # type: ignore[return-value]


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion `p` observed over `n` trials.

    >>> [round(x, 4) for x in wilson_interval(0.5, 10)]  # 5 of 10
    [0.2366, 0.7634]
    >>> [round(x, 4) for x in wilson_interval(1.0, 10)]  # never [1, 1], unlike the normal interval
    [0.7225, 1.0]
    """
    if n <= 0:
        return math.nan, math.nan
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# --- ratings across many models ------------------------------------------------------------------


def bradley_terry(comparisons: Sequence[tuple[str, str, float]], *, prior: float = 0.0,
                  tol: float = 1e-10, max_iter: int = 100_000) -> dict[str, float]:
    """Bradley-Terry strengths by maximum likelihood (Hunter's 2004 MM algorithm), on the Elo scale.

    Each comparison is `(first, second, score of first)`: 1 a win, 0 a loss, 0.5 a tie (a tie
    counts half a win for each). Ratings are 400 * log10(strength), shifted so their mean is 1000:
    a 400-point gap means 10:1 odds. Order of the comparisons does not matter.

    The maximum-likelihood estimate exists only when every player has beaten, at least in part,
    someone who is in turn connected back to it (Hunter's condition: the "beat" graph is strongly
    connected); otherwise this raises. `prior` > 0 adds that many half-won games for every player
    against a fixed average player, which always makes it exist and shrinks ratings of players
    with few games.

    >>> r = bradley_terry([("a", "b", 1.0)] * 3 + [("a", "b", 0.0)])  # a beats b 3 of 4
    >>> round(r["a"] - r["b"], 2), round((r["a"] + r["b"]) / 2, 6)  # 400 * log10(3)
    (190.85, 1000.0)
    """
    wins: dict[str, float] = defaultdict(float)
    games: dict[tuple[str, str], float] = defaultdict(float)  # both orders stored
    for first, second, score in comparisons:
        if first == second or not 0.0 <= score <= 1.0:
            raise ValueError(f"bad comparison {(first, second, score)}: two players, score in [0, 1]")
        wins[first] += score
        wins[second] += 1.0 - score
        games[first, second] += 1.0
        games[second, first] += 1.0
    players = sorted(wins)
    if not players:
        return {}
    if prior <= 0:
        _require_connected(players, comparisons)
    opponents: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (i, j), n_ij in games.items():
        opponents[i].append((j, n_ij))

    strength = dict.fromkeys(players, 1.0)
    for _ in range(max_iter):
        new = {}
        for i in players:
            denominator = sum(n_ij / (strength[i] + strength[j]) for j, n_ij in opponents[i])
            denominator += 2 * prior / (strength[i] + 1.0)  # the fixed average player has strength 1
            new[i] = (wins[i] + prior) / denominator
        if prior <= 0:  # the likelihood only fixes ratios: pin the geometric mean to 1
            log_mean = sum(math.log(s) for s in new.values()) / len(new)
            new = {i: s / math.exp(log_mean) for i, s in new.items()}
        change = max(abs(math.log(new[i] / strength[i])) for i in players)
        strength = new
        if change < tol:
            break
    elo_scale = {i: 400 * math.log10(s) for i, s in strength.items()}
    shift = 1000 - sum(elo_scale.values()) / len(elo_scale)
    return {i: r + shift for i, r in elo_scale.items()}


def _require_connected(players: list[str], comparisons: Sequence[tuple[str, str, float]]) -> None:
    """Raise unless every player can reach every other along "scored against" edges both ways."""
    beat: dict[str, set[str]] = defaultdict(set)
    for first, second, score in comparisons:
        if score > 0:
            beat[first].add(second)
        if score < 1:
            beat[second].add(first)
    lost_to: dict[str, set[str]] = defaultdict(set)
    for winner, losers in beat.items():
        for loser in losers:
            lost_to[loser].add(winner)
    for edges, how in ((beat, "never beat"), (lost_to, "never lost to")):
        seen, todo = {players[0]}, [players[0]]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        if missing := sorted(set(players) - seen):
            raise ValueError(f"Bradley-Terry ratings are unbounded: {players[0]!r} {how} (even "
                             f"indirectly) {', '.join(map(repr, missing))}; pass prior > 0")


def elo(comparisons: Sequence[tuple[str, str, float]], *, k: float = 32.0, initial: float = 1000.0
        ) -> dict[str, float]:
    """Plain sequential Elo over `(first, second, score of first)` in the order given.

    Unlike `bradley_terry` the result depends on the order (recent games weigh more), which is
    what a live leaderboard wants and a one-off promotion decision does not.

    >>> elo([("a", "b", 1.0)])  # equal ratings, expected score 0.5: a gains k/2
    {'a': 1016.0, 'b': 984.0}
    """
    ratings: dict[str, float] = {}
    for first, second, score in comparisons:
        ra, rb = ratings.setdefault(first, initial), ratings.setdefault(second, initial)
        expected = 1.0 / (1.0 + 10 ** ((rb - ra) / 400))
        ratings[first] = ra + k * (score - expected)
        ratings[second] = rb - k * (score - expected)
    return ratings
