"""lm-evaluation-harness on our own checkpoint: the shipped local task and a user's YAML folder run
through lm-eval's real `simple_evaluate` (one model load for both), offline, and come back as
`eval/<task>/<metric>` metrics whose aggregates are the means of the per-item rows."""

from __future__ import annotations

import doctest
import json
import math
import socket
import statistics
from pathlib import Path

import pytest

from stages import harness

LIMIT = 12
USER_ROWS = [  # a user's own two-choice task; the content does not matter, only that it runs
    {"q": "The sky is", "options": [" blue", " loud"], "gold": 0},
    {"q": "Two plus two is", "options": [" seven", " four"], "gold": 1},
    {"q": "Water is", "options": [" wet", " square"], "gold": 0},
]
USER_YAML = """\
task: user_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/facts.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: options
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's include folder whose YAML names its data file relative to itself."""
    root = tmp_path_factory.mktemp("user-tasks")
    (root / "data").mkdir()
    (root / "data" / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in USER_ROWS))
    (root / "user_facts.yaml").write_text(USER_YAML)
    return root


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


@pytest.fixture(scope="module")
def scored(sft_trained, user_tasks, tmp_path_factory) -> tuple[dict[str, float], list[dict]]:
    """Both tasks in one lm-eval run, with every outbound TCP/UDP connection turned into a failure
    and the datasets cache kept out of $HOME."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets-cache"))
        return harness.evaluate(sft_trained.checkpoint, ["flywheel_arithmetic", "user_facts"],
                                include_path=user_tasks, limit=LIMIT, batch_size=8)


def _items(items: list[dict], metric: str) -> dict[str, float]:
    rows = [r for r in items if r["metric"] == metric]
    by_item = {r["item"]: r["value"] for r in rows}
    assert len(by_item) == len(rows), f"duplicate item ids for {metric}"
    return by_item


def test_metric_names_values_and_stderr(scored) -> None:
    metrics, _ = scored
    assert set(metrics) == {
        "eval/flywheel_arithmetic/acc", "eval/flywheel_arithmetic/acc_stderr",
        "eval/flywheel_arithmetic/acc_norm", "eval/flywheel_arithmetic/acc_norm_stderr",
        "eval/user_facts/acc", "eval/user_facts/acc_stderr",
    }
    for name, value in metrics.items():
        assert math.isfinite(value) and 0.0 <= value <= 1.0, (name, value)


@pytest.mark.parametrize(("metric", "docs"), [
    ("eval/flywheel_arithmetic/acc", LIMIT),
    ("eval/flywheel_arithmetic/acc_norm", LIMIT),
    ("eval/user_facts/acc", len(USER_ROWS)),  # fewer documents than the limit: all of them
])
def test_items_pair_by_doc_and_average_to_the_aggregate(scored, metric: str, docs: int) -> None:
    metrics, items = scored
    values = _items(items, metric)
    assert sorted(values, key=int) == [str(i) for i in range(docs)]  # lm-eval's doc ids, one row each
    assert set(values.values()) <= {0.0, 1.0}  # accuracy per document
    assert metrics[metric] == pytest.approx(statistics.fmean(values.values()), abs=1e-12)
    # lm-eval's stderr of a mean is the items' sample standard deviation over sqrt(n): the stderr
    # we return belongs to exactly these items.
    expected = statistics.stdev(values.values()) / math.sqrt(docs)
    assert metrics[metric + "_stderr"] == pytest.approx(expected, abs=1e-12)


def test_shipped_data_is_the_generators_output() -> None:
    """The data file next to the YAML is what write_arithmetic_choices() writes: regenerate, don't edit."""
    rows = [json.loads(line) for line in harness.ARITHMETIC_DATA.read_text().splitlines()]
    assert rows == harness.arithmetic_choices()
    assert len(rows) >= 24
    for row in rows:
        answer = int(row["choices"][row["label"]])
        assert len(set(row["choices"])) == 4
        assert str(answer) in row["choices"] and all(int(c) >= 0 for c in row["choices"])


def test_unknown_task_is_one_line_naming_it() -> None:
    with pytest.raises(harness.UnknownTaskError) as err:
        harness.load_tasks(["flywheel_arithmetc"])
    message = str(err.value)
    assert "'flywheel_arithmetc'" in message and "\n" not in message
    assert "flywheel_arithmetic" in message  # the near miss is suggested


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_bad_include_path_is_one_line_naming_it(tmp_path: Path, make) -> None:
    bad = make(tmp_path)  # a folder that does not exist, and one with no YAML in it
    with pytest.raises(harness.IncludePathError, match=str(bad)):
        harness.load_tasks(["flywheel_arithmetic"], include_path=bad)


def test_not_a_checkpoint_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path} is not a Hugging Face directory"):
        harness.evaluate(tmp_path, ["flywheel_arithmetic"])


def test_harness_doctest() -> None:
    result = doctest.testmod(harness)
    assert result.attempted > 0 and result.failed == 0
