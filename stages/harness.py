"""Score a checkpoint with lm-evaluation-harness: our own local tasks, any harness task by name, or
a folder of the user's task YAMLs.

    from stages import harness
    metrics, items = harness.evaluate(Path("runs/sft/final"), ["flywheel_arithmetic"], limit=50)
    metrics["eval/flywheel_arithmetic/acc"], metrics["eval/flywheel_arithmetic/acc_stderr"]

`python -m stages.harness CHECKPOINT TASK [TASK ...] [--limit N] [--include-path DIR]` prints the
metrics as JSON.

The checkpoint directory goes to lm-eval unchanged (`model="hf"`, `pretrained=DIR`): this module
only resolves task names, loads the tasks so that a failure names its task in one line, and turns
lm-eval's result dict into our metric names plus per-item rows a promotion gate can pair:

- metrics: `eval/<task>/<metric>` and `eval/<task>/<metric>_stderr` (lm-eval's own standard error;
  absent where lm-eval reports "N/A"). A metric computed under a filter other than lm-eval's
  "none" (e.g. gsm8k's "strict-match") is named `<metric>.<filter>`.
- items: `{"metric": "eval/<task>/<metric>", "item": "<doc_id>", "value": float}`, one per
  evaluated document and per-document numeric metric, from lm-eval's logged samples. The same task
  and limit give the same doc ids for every checkpoint.

Tasks in `stages/tasks/harness/` are always available by name. A relative `data_files` path in a
local YAML is resolved against that YAML's folder here (lm-eval alone resolves it against the
working directory, so a task would only work when run from one place); this covers tasks asked for
by name, not the members of a local group, which keep lm-eval's rule.
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.tasks import arithmetic

TASKS_DIR = Path(__file__).parent / "tasks" / "harness"
ARITHMETIC_DATA = TASKS_DIR / "flywheel_arithmetic.jsonl"
# collect's default held-out share: the shipped questions all fall in its test split, so a model
# trained on collect's train split has never seen them.
HELD_OUT_FRACTION = 0.1


class HarnessError(ValueError):
    """A task or include path lm-eval cannot use; the message is one line that names it."""


class UnknownTaskError(HarnessError):
    pass


class IncludePathError(HarnessError):
    pass


class TaskLoadError(HarnessError):
    pass


def evaluate(checkpoint: Path, tasks: Sequence[str], *, include_path: Path | None = None,
             limit: int | None = None, device: str = "cpu", batch_size: int = 8
             ) -> tuple[dict[str, float], list[dict]]:
    """Run lm-eval's `simple_evaluate` on `checkpoint` and return (metrics, per-item rows).

    `limit` caps the documents per task (lm-eval takes the first `limit`), for tests and quick
    looks; leave it None for a score worth comparing with published numbers.
    """
    import lm_eval

    if isinstance(tasks, str):
        tasks = [tasks]  # a bare string would otherwise be read as one task per character
    if not tasks:
        raise HarnessError("no lm-eval tasks given")
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise HarnessError(f"checkpoint {checkpoint} is not a Hugging Face directory (no config.json)")
    loaded = load_tasks(tasks, include_path)
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoint}", tasks=loaded,
                                  device=device, batch_size=batch_size, limit=limit, log_samples=True)
    return metrics_from_results(out["results"]), items_from_samples(out["samples"])


def load_tasks(tasks: Sequence[str], include_path: Path | None = None) -> list:
    """lm-eval Task/Group objects for `tasks`, each name checked and loaded on its own.

    Loading here rather than inside `simple_evaluate` is what lets an error name its task: a
    missing dataset, a hub download refused offline or a broken YAML surfaces as one
    `TaskLoadError` line (the original exception stays chained for whoever needs the traceback).
    """
    paths = _include_paths(include_path)
    manager = _task_manager(tasks, paths)
    built: list = []
    for name in tasks:
        spec = _spec(manager, name, paths)
        try:
            loaded = manager.load([spec])
        except Exception as err:  # noqa: BLE001 - re-raised with the task's name, cause chained
            raise TaskLoadError(f"lm-eval task {name!r} could not be loaded: {_first_line(err)}") from err
        group = loaded["groups"].get(name)
        built.extend([group] if group is not None else loaded["tasks"].values())
    return built


def _include_paths(include_path: Path | None) -> list[Path]:
    if include_path is None:
        return [TASKS_DIR]
    path = Path(include_path).expanduser().resolve()
    if not path.is_dir():
        raise IncludePathError(f"include path {path} is not a directory")
    if not any(path.rglob("*.yaml")):
        raise IncludePathError(f"include path {path} holds no task YAML (*.yaml)")
    return [TASKS_DIR, path]


def _task_manager(tasks: Sequence[str], paths: list[Path]):
    """A TaskManager that knows every name in `tasks`, or UnknownTaskError naming the first it lacks.

    Indexing lm-eval's ~15k built-in tasks costs about 8 s on 2 cores, so when every requested name
    is a plain task in our folders the built-ins are left out.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    index = local.task_index
    if all(name in index and index[name].kind == Kind.TASK for name in tasks):
        return local
    manager = TaskManager(include_path=[str(p) for p in paths])
    for name in tasks:
        if name not in manager.task_index and not Path(name).is_file():
            near = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UnknownTaskError(f"unknown lm-eval task {name!r}: not a harness task, not in "
                                   f"{', '.join(map(str, paths))}{hint}")
    return manager


def _spec(manager, name: str, paths: list[Path]) -> str | dict[str, Any]:
    """`name`, or for one of our local YAML tasks its full config with data_files made absolute."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.kind != Kind.TASK or entry.yaml_path is None:
        return name
    yaml_path = Path(entry.yaml_path).resolve()
    if not any(yaml_path.is_relative_to(p.resolve()) for p in paths):
        return name  # a built-in task: lm-eval's own layout, leave it alone
    cfg = load_yaml(yaml_path, resolve_func=True)
    data_files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if data_files is None:
        return name
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"],
                             "data_files": _absolute(data_files, yaml_path.parent)}
    return cfg


def _absolute(data_files: str | list | dict, base: Path) -> str | list | dict:
    """data_files (a path, a list of them, or split -> path(s)) with relative paths put under `base`.

    >>> _absolute({"test": "a.jsonl", "train": ["/d/b.jsonl", "c.jsonl"]}, Path("/t"))
    {'test': '/t/a.jsonl', 'train': ['/d/b.jsonl', '/t/c.jsonl']}
    >>> _absolute("hf://datasets/x/y.json", Path("/t"))
    'hf://datasets/x/y.json'
    """
    if isinstance(data_files, dict):
        return {split: _absolute(files, base) for split, files in data_files.items()}
    if isinstance(data_files, list):
        return [_absolute(f, base) for f in data_files]
    if "://" in data_files or Path(data_files).is_absolute():
        return data_files
    return str(base / data_files)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def metric_name(task: str, key: str) -> tuple[str, bool] | None:
    """Our name for lm-eval's result key `"<metric>,<filter>"` and whether it is a stderr.

    >>> metric_name("arc_easy", "acc,none"), metric_name("arc_easy", "acc_stderr,none")
    (('eval/arc_easy/acc', False), ('eval/arc_easy/acc_stderr', True))
    >>> metric_name("gsm8k", "exact_match,strict-match")
    ('eval/gsm8k/exact_match.strict-match', False)
    >>> metric_name("gsm8k", "exact_match_stderr,strict-match")
    ('eval/gsm8k/exact_match.strict-match_stderr', True)
    >>> metric_name("arc_easy", "alias") is None
    True
    """
    if "," not in key:
        return None  # "alias", "samples", "name": bookkeeping, not metrics
    metric, filter_name = key.split(",", 1)
    stderr = metric.endswith("_stderr")
    base = metric.removesuffix("_stderr")
    if filter_name != "none":
        base = f"{base}.{filter_name}"
    # MLflow allows letters, digits, _ - . / and spaces in metric names.
    name = re.sub(r"[^\w\-./ ]", "_", f"eval/{task}/{base}")
    return (f"{name}_stderr" if stderr else name), stderr


def metrics_from_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's `out["results"]` as flat, numeric `eval/...` metrics.

    >>> metrics_from_results({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.25,
    ...                             "f1,none": 0.7, "f1_stderr,none": "N/A"}})
    {'eval/t/acc': 0.5, 'eval/t/acc_stderr': 0.25, 'eval/t/f1': 0.7}
    """
    metrics: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            named = metric_name(task, key)
            if named is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "N/A" stderr: lm-eval could not compute one (e.g. a single document)
            metrics[named[0]] = float(value)
    return metrics


def items_from_samples(samples: dict[str, list[dict[str, Any]]]) -> list[dict]:
    """One row per (logged document, per-document numeric metric).

    Corpus-level metrics (bleu, chrF: the per-document value is a (reference, prediction) tuple)
    have no per-item score and give no rows.

    >>> items_from_samples({"t": [{"doc_id": 3, "filter": "none", "metrics": ["acc", "bleu"],
    ...                            "acc": 1.0, "bleu": ("ref", "pred")}]})
    [{'metric': 'eval/t/acc', 'item': '3', 'value': 1.0}]
    """
    rows: list[dict] = []
    for task, logged in samples.items():
        for sample in logged:
            filter_name = sample.get("filter", "none")
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                rows.append({"metric": metric_name(task, f"{metric},{filter_name}")[0],
                             "item": str(sample["doc_id"]), "value": float(value)})
    return rows


# --- the shipped arithmetic task --------------------------------------------------------------


def arithmetic_choices(n: int = 48, seed: int = 7) -> list[dict[str, Any]]:
    """`n` four-way multiple-choice rows `{question, choices, label}` from held-out arithmetic problems.

    Distractors sit next to the answer (off by 1, 2 or 10, never negative), so choosing right
    takes the arithmetic rather than a guess at the magnitude.

    >>> rows = arithmetic_choices(3)
    >>> rows == arithmetic_choices(3), [len(set(r["choices"])) for r in rows]
    (True, [4, 4, 4])
    >>> all(arithmetic.split_of(r["question"], HELD_OUT_FRACTION) == "test" for r in rows)
    True
    """
    candidates = arithmetic.generate(max(1000, 40 * n), seed=seed)
    held_out = [p for p in candidates if arithmetic.split_of(p.question, HELD_OUT_FRACTION) == "test"]
    if len(held_out) < n:
        raise ValueError(f"only {len(held_out)} held-out problems for n={n}")
    rng = random.Random(seed)
    rows = []
    for p in held_out[:n]:
        wrong = [p.answer + d for d in (-10, -2, -1, 1, 2, 10) if p.answer + d >= 0]
        choices = [p.answer, *rng.sample(wrong, 3)]
        rng.shuffle(choices)
        rows.append({"question": p.question, "choices": [str(c) for c in choices],
                     "label": choices.index(p.answer)})
    return rows


def write_arithmetic_choices(path: Path = ARITHMETIC_DATA, n: int = 48, seed: int = 7) -> Path:
    """Write `arithmetic_choices(n, seed)` as JSONL (the shipped file is the defaults' output)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_choices(n, seed)))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--include-path", type=Path)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        metrics, _ = evaluate(args.checkpoint, args.tasks, include_path=args.include_path,
                              limit=args.limit, device=args.device, batch_size=args.batch_size)
    except HarnessError as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
