"""The evaluation stage: numbers a statistical promotion gate can trust.

Every metric carries a standard error, every mean metric is exactly the mean of its items in
items.jsonl, item ids do not depend on the checkpoint (so a challenger pairs with the champion),
the held-out split is pretraining's by construction, and bad input fails with one clear line.

The shared corpus, tokenizer, pretrained and SFT checkpoints come from tests/stages/conftest.py.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stages import checkpoint as ckpt
from stages import evaluate
from stages.chat import load_problems
from stages.config import ConfigError, from_dict, load_preset, parse_overrides
from stages.evaluate import EvaluateConfig, HeldoutSplitUnknown, MissingTokenizer, read_items
from stages.rollout import Samples
from stages.tasks import multiple_choice as mc
from stages.tasks.multiple_choice import MMLUFormatError
from stages.token_shards import TokenShards
from stages.tracking import RecordingTracker

from .conftest import Trained

REPO = Path(__file__).resolve().parents[2]
GSM8K_TRAIN = REPO / ".." / "shared" / "datasets" / "gsm8k" / "train.jsonl"
NAME = re.compile(r"eval/[a-z0-9_]+/[a-z0-9_.]+")
MMLU_ROWS = ('What is 2 + 2?,3,4,5,22,B\n"Which is a colour, if any?",red,seven,Tuesday,none,A\n'
             "Water boils at (sea level)?,50 C,100 C,150 C,200 C,B\n")
GSM8K_ROWS = [{"question": "Ann has 3 apples and buys 4 more. How many apples does she have?",
               "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
              {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "6 x 2 = <<6*2=12>>12\n#### 12"}]


def eval_files(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny_mmlu.csv").write_text(MMLU_ROWS)
    (root / "tiny_gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    return root / "tiny_mmlu.csv", root / "tiny_gsm8k.jsonl"


def every_task(checkpoint: Path, corpus: Path, output_dir: Path, files: tuple[Path, Path]) -> EvaluateConfig:
    return EvaluateConfig(
        checkpoint=checkpoint, dataset=corpus, output_dir=output_dir, progress=False,
        tasks=("heldout", "arithmetic", "arithmetic_mc", "mmlu", "gsm8k"), seq_len=64, perplexity_windows=16,
        arithmetic_problems=6, max_new_tokens=16, batch_size=24, passk_samples=4, passk_k=(1, 2),
        passk_temperatures=(0.7, 1.0), mmlu_files=(files[0],), gsm8k_files=(files[1],), gsm8k_max_new_tokens=12)


@pytest.fixture(scope="module")
def evaluated(corpus: Path, pretrained: Trained, sft_trained: Trained, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, tuple[evaluate.EvaluateResult, RecordingTracker]]:
    """Both checkpoints on every built-in task with the same data and config (one run each)."""
    root = tmp_path_factory.mktemp("evaluate")
    files = eval_files(root / "files")
    out = {}
    for name, trained in (("pretrain", pretrained), ("sft", sft_trained)):
        tracker = RecordingTracker()
        out[name] = evaluate.run(every_task(trained.checkpoint, corpus, root / name, files), tracker=tracker), tracker
    return out


# --- metrics, items, report ------------------------------------------------------------------


def test_every_metric_is_named_and_has_a_stderr(evaluated) -> None:
    result, tracker = evaluated["sft"]
    m = result.metrics
    headline = [k for k in m if not k.endswith("_stderr")]
    assert all(NAME.fullmatch(k) for k in m), [k for k in m if not NAME.fullmatch(k)]
    assert all(f"{k}_stderr" in m for k in headline) and len(m) == 2 * len(headline)
    assert {"eval/heldout/perplexity", "eval/heldout/nll", "eval/arithmetic/accuracy", "eval/arithmetic/format_rate",
            "eval/arithmetic/pass_at_1_t0.7", "eval/arithmetic/pass_at_2_t1", "eval/arithmetic_mc/accuracy",
            "eval/arithmetic_mc/ece", "eval/mmlu/accuracy", "eval/mmlu/ece", "eval/gsm8k/accuracy"} <= set(headline)
    assert all(math.isfinite(v) for v in m.values())  # every task has >= 2 items, so every stderr is defined
    assert m["eval/heldout/perplexity"] == pytest.approx(math.exp(m["eval/heldout/nll"]))
    assert m["eval/heldout/perplexity_stderr"] == pytest.approx(m["eval/heldout/perplexity"] * m["eval/heldout/nll_stderr"])
    for k in headline:
        if not k.startswith("eval/heldout/"):
            assert 0 <= m[k] <= 1, k
    assert m["eval/arithmetic/pass_at_2_t0.7"] >= m["eval/arithmetic/pass_at_1_t0.7"]  # more tries never hurt
    assert 0.25 <= m["eval/mmlu/confidence"] <= 1  # the argmax of 4 options holds at least a quarter
    assert tracker.metrics[-1] == (None, m)
    assert [p.name for p, _ in tracker.artifacts] == ["evaluation.json", "items.jsonl", "passk_vs_temperature.png"]


def test_aggregate_metrics_are_the_mean_of_their_items(evaluated) -> None:
    result, _ = evaluated["sft"]
    items = read_items(result.items)
    assert "eval/heldout/perplexity" not in items and "eval/mmlu/ece" not in items  # not means of items
    assert {len(items["eval/heldout/nll"]), len(items["eval/arithmetic/accuracy"]), len(items["eval/mmlu/accuracy"]),
            len(items["eval/gsm8k/accuracy"])} == {16, 6, 3, 2}
    for metric, values in items.items():
        assert result.metrics[metric] == pytest.approx(sum(values.values()) / len(values)), metric
    report = json.loads(result.report.read_text())
    assert report["metrics"] == result.metrics
    assert report["items"] == {metric: len(v) for metric, v in items.items()}
    # each sampled verdict is the GSM8K scorer's verdict on the completion's final number
    assert all(s["correct"] == float(s["predicted"] == s["answer"]) for s in report["samples"]["gsm8k"])


def test_item_ids_do_not_depend_on_the_checkpoint(evaluated) -> None:
    pre, sft = (read_items(evaluated[name][0].items) for name in ("pretrain", "sft"))
    assert pre.keys() == sft.keys()
    for metric in pre:
        assert pre[metric].keys() == sft[metric].keys(), metric
    # ... while the scores do: two different models were measured
    assert pre["eval/heldout/nll"] != sft["eval/heldout/nll"]
    ids = list(sft["eval/arithmetic/accuracy"])
    assert ids == list(sft["eval/arithmetic_mc/accuracy"]) == list(sft["eval/arithmetic/pass_at_2_t0.7"])
    assert list(sft["eval/mmlu/accuracy"]) == ["tiny_mmlu:1", "tiny_mmlu:2", "tiny_mmlu:3"]


def test_passk_plot_is_a_png(evaluated) -> None:
    result, _ = evaluated["sft"]
    png = result.report.parent / "passk_vs_temperature.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_multiple_choice_scoring_is_deterministic(sft_trained: Trained, tmp_path: Path) -> None:
    questions = mc.load_mmlu_csv(eval_files(tmp_path)[0])
    model, tok = ckpt.load_model(sft_trained.checkpoint).eval(), ckpt.load_tokenizer(sft_trained.checkpoint)
    first = mc.score(model, tok, questions, batch_size=5)  # batches cut across questions
    assert first == mc.score(model, tok, questions, batch_size=12)
    for s in first:
        assert len(s.loglikelihoods) == 4 and all(x < 0 for x in s.loglikelihoods)
        assert s.loglikelihoods[s.predicted] == max(s.loglikelihoods) and s.confidence >= 0.25


# --- the held-out split ----------------------------------------------------------------------


def test_heldout_perplexity_matches_pretraining(corpus: Path, pretrained: Trained, tmp_path: Path) -> None:
    # Same held-out split, same windows: the number is comparable along the lineage.
    cfg = EvaluateConfig(checkpoint=pretrained.checkpoint, dataset=corpus, output_dir=tmp_path, tasks=("heldout",),
                         seq_len=pretrained.cfg.seq_len, perplexity_windows=pretrained.cfg.eval_windows, progress=False)
    m = evaluate.run(cfg).metrics
    assert m["eval/heldout/perplexity"] == pytest.approx(pretrained.result.metrics["eval/heldout/perplexity"], rel=1e-4)
    assert not any(k.startswith("eval/arithmetic") for k in m)


def test_heldout_split_is_pretrainings_along_the_lineage(corpus: Path, pretrained: Trained, sft_trained: Trained,
                                                         tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    heldout = TokenShards(pretrained.cfg.tokens, "heldout")  # the held-out shards pretraining measured on
    pretraining_tokens = heldout.read(0, len(heldout))
    tok = ckpt.load_tokenizer(pretrained.checkpoint)
    for trained in (pretrained, sft_trained):  # SFT's meta.json names pretraining as its parent
        cfg = EvaluateConfig(checkpoint=trained.checkpoint, dataset=corpus, output_dir=tmp_path, seq_len=64,
                             perplexity_windows=4)
        assert evaluate.tokens_of(cfg) == Path(pretrained.cfg.tokens)
        # Read from the held-out split, memory-mapped: just the windows measured (4 of 64 + the last target).
        assert np.array_equal(evaluate.heldout_tokens(cfg, tok), pretraining_tokens[: 4 * 64 + 1])

    # Shards named in the lineage are read with no setting to forget: from the ancestry embedded in
    # meta.json (a registry copy has no parent folders)...
    moved = Path(shutil.copytree(pretrained.cfg.tokens, tmp_path / "moved-tokens"))
    child = copy_checkpoint(sft_trained.checkpoint, tmp_path / "sft")
    edit_meta(child, lambda m: (m["parent_meta"]["config"].update(tokens=str(moved)),
                                m.update(parent=str(tmp_path / "gone"))))
    cfg = EvaluateConfig(checkpoint=child, dataset=corpus, output_dir=tmp_path)
    assert evaluate.tokens_of(cfg) == moved
    # ... or, for a checkpoint written before configs were embedded, from the parent's folder.
    base, old = copy_checkpoint(pretrained.checkpoint, tmp_path / "pt"), copy_checkpoint(sft_trained.checkpoint, tmp_path / "old")
    edit_meta(base, lambda m: m["config"].update(tokens=str(moved)))
    edit_meta(old, lambda m: (m["parent_meta"].pop("config"), m.update(parent=str(base))))
    assert evaluate.tokens_of(replace(cfg, checkpoint=old)) == moved

    # Naming other shards is allowed (a copy, a DVC checkout) but said out loud.
    with caplog.at_level("WARNING", logger="stages.evaluate"):
        assert evaluate.tokens_of(replace(cfg, tokens=pretrained.cfg.tokens)) == Path(pretrained.cfg.tokens)
    assert f"pretraining read {moved}, evaluation reads {pretrained.cfg.tokens}" in caplog.text
    # Shards the lineage names but this machine lacks: a clear error, not another split.
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match=r"pretrained on .*moved-tokens, which is not here"):
        evaluate.tokens_of(cfg)


def test_heldout_refuses_shards_of_another_tokenizer(corpus: Path, pretrained: Trained, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(pretrained.cfg.tokens, tmp_path / "tokens"))
    index = json.loads((copy / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps({**index, "vocab_size": index["vocab_size"] + 1}))
    cfg = EvaluateConfig(checkpoint=pretrained.checkpoint, dataset=corpus, output_dir=tmp_path / "out", tokens=copy,
                         tasks=("heldout",), progress=False)
    with pytest.raises(ValueError, match=r"tokenized by another tokenizer .*vocabulary \d+ and separator"):
        evaluate.run(cfg)


def test_no_pretraining_in_the_lineage_is_a_clear_error(corpus: Path, sft_trained: Trained, pretrained: Trained,
                                                        tmp_path: Path) -> None:
    orphan = copy_checkpoint(sft_trained.checkpoint, tmp_path / "orphan")
    edit_meta(orphan, lambda m: m.update(parent=str(tmp_path / "gone")))
    # With its parent folder gone, the ancestry embedded in meta.json still names pretraining's shards.
    cfg = EvaluateConfig(checkpoint=orphan, dataset=corpus, output_dir=tmp_path / "out", tasks=("heldout",))
    assert evaluate.tokens_of(cfg) == Path(pretrained.cfg.tokens)
    edit_meta(orphan, lambda m: m.update(parent_meta=None))  # no embedded ancestry either (an old checkpoint)
    with pytest.raises(HeldoutSplitUnknown, match=r"no pretraining checkpoint in its lineage \(sft at .*orphan -> "
                                                  r"no meta\.json in .*gone\); pass evaluate\.tokens="):
        evaluate.run(cfg)
    assert evaluate.tokens_of(replace(cfg, tokens=tmp_path)) == tmp_path  # e.g. a model from the Hub


# --- bad input -------------------------------------------------------------------------------


def test_missing_tokenizer_names_the_checkpoint(corpus: Path, sft_trained: Trained, tmp_path: Path) -> None:
    bare = copy_checkpoint(sft_trained.checkpoint, tmp_path / "bare")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / f).unlink()
    with pytest.raises(MissingTokenizer, match=rf"checkpoint {re.escape(str(bare))} has no tokenizer"):
        evaluate.run(EvaluateConfig(checkpoint=bare, dataset=corpus, output_dir=tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory .*nowhere does not exist"):
        evaluate.run(EvaluateConfig(checkpoint=tmp_path / "nowhere", dataset=corpus, output_dir=tmp_path / "out"))


def test_bad_eval_files_fail_before_any_scoring(corpus: Path, sft_trained: Trained, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt, "load_model", lambda *a, **k: pytest.fail("model loaded before the data was checked"))
    base = dict(checkpoint=sft_trained.checkpoint, dataset=corpus, output_dir=tmp_path / "out", tasks=("mmlu",))
    with pytest.raises(FileNotFoundError, match=r"mmlu file .*missing\.csv does not exist"):
        evaluate.run(EvaluateConfig(**base, mmlu_files=(tmp_path / "missing.csv",)))
    bad = tmp_path / "physics_test.csv"
    bad.write_text("q,a,b,c,d,A\nq,a,b,c,d,A\nq,a,b,c,d\n")
    with pytest.raises(MMLUFormatError, match=r"physics_test\.csv:3: expected 6 columns"):
        evaluate.run(EvaluateConfig(**base, mmlu_files=(bad,)))
    with pytest.raises(FileNotFoundError, match=r"gsm8k file .*none\.jsonl does not exist"):
        evaluate.run(EvaluateConfig(**{**base, "tasks": ("gsm8k",)}, gsm8k_files=(tmp_path / "none.jsonl",)))
    good = tmp_path / "good.csv"
    good.write_text(MMLU_ROWS)
    with pytest.raises(ValueError, match=r"evaluate mmlu: item 'good:1' appears twice .*the same file listed twice"):
        evaluate.run(EvaluateConfig(**base, mmlu_files=(good, good)))
    assert not (tmp_path / "out" / "items.jsonl").exists()


def test_config_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    base = dict(checkpoint=tmp_path, dataset=tmp_path, output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown task 'mmlu_pro' \(valid tasks: heldout, arithmetic"):
        EvaluateConfig(**base, tasks=("heldout", "mmlu_pro"))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvaluateConfig(**base, tasks=())
    with pytest.raises(ValueError, match="task 'mmlu' needs mmlu_files"):
        EvaluateConfig(**base, tasks=("mmlu",))
    with pytest.raises(ValueError, match="gsm8k_files needs 'gsm8k' in tasks"):
        EvaluateConfig(**base, gsm8k_files=(tmp_path / "g.jsonl",))
    with pytest.raises(ValueError, match=r"passk_k must lie in \[1, passk_samples=2\]"):
        EvaluateConfig(**base, passk_samples=2, passk_k=(1, 4))


def test_config_from_the_preset_and_the_command_line() -> None:
    wiring = {"checkpoint": "c", "dataset": "d", "output_dir": "o"}
    assert from_dict(EvaluateConfig, {**load_preset("tiny")["evaluate"], **wiring}).arithmetic_problems == 400
    cfg = from_dict(EvaluateConfig, {**parse_overrides(["tasks=[heldout,mmlu]", "mmlu_files=[a.csv,b.csv]",
                                                        "passk_temperatures=[0.5,1]", "limit=null"]), **wiring})
    assert cfg.tasks == ("heldout", "mmlu") and cfg.mmlu_files == (Path("a.csv"), Path("b.csv"))
    assert cfg.passk_temperatures == (0.5, 1.0) and cfg.limit is None
    one = from_dict(EvaluateConfig, {**parse_overrides(["tasks=arithmetic_mc", "passk_samples=8", "passk_k=8"]), **wiring})
    assert one.tasks == ("arithmetic_mc",) and one.passk_k == (8,)
    with pytest.raises(ConfigError, match="unknown config key heldout_frac"):
        from_dict(EvaluateConfig, {"heldout_frac": 0.1, **wiring})


def test_read_items_refuses_duplicates_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    row = {"metric": "eval/x/accuracy", "item": "q-1", "value": 1.0}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "item": "q-2", "value": 0}) + "\n")
    assert read_items(path) == {"eval/x/accuracy": {"q-1": 1.0, "q-2": 0.0}}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"items\.jsonl:2: item 'q-1' of eval/x/accuracy appears twice"):
        read_items(path)
    path.write_text('{"metric": "m"}\n')
    with pytest.raises(ValueError, match=r"items\.jsonl:1: not an items row"):
        read_items(path)


# --- arithmetic bookkeeping, real GSM8K ------------------------------------------------------


def test_arithmetic_scores_bookkeeping(corpus: Path, pretrained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    problems = load_problems(corpus, "test")[:7]

    # Per problem, by position: right and formatted / right, bare / wrong, formatted / garbage.
    def completion(i: int, answer: int) -> str:
        return [f"<think>x</think> <answer>{answer}</answer>", f"<answer>{answer}</answer>",
                f"<think>x</think> <answer>{answer + 1}</answer>", "no idea"][i % 4]

    answer_of = {p.question: p.answer for p in problems}
    index_of = {p.question: i for i, p in enumerate(problems)}

    def fake_sample(model, tokenizer, prompts, *, n, max_new_tokens, temperature, seed=0):
        assert n == 1 and temperature == 0.0
        questions = [re.fullmatch(r"<\|user\|>(.*)<\|end\|><\|assistant\|>", p, re.DOTALL).group(1) for p in prompts]
        texts = [completion(index_of[q], answer_of[q]) for q in questions]
        return Samples(prompts=[[0]] * len(texts), completions=[[0]] * len(texts), texts=texts)

    monkeypatch.setattr(evaluate, "sample", fake_sample)
    tok = ckpt.load_tokenizer(pretrained.checkpoint)
    cfg = EvaluateConfig(checkpoint=pretrained.checkpoint, dataset=corpus, output_dir=Path("unused"), batch_size=3,
                         max_new_tokens=8, progress=False)
    out = evaluate.arithmetic_task(cfg, None, tok, problems)
    # Indices 0..6 -> kinds 0,1,2,3,0,1,2: correct at 0,1,4,5; formatted at 0,2,4,6.
    correct, formatted = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert [r["correct"] for r in out.samples] == correct and [r["formatted"] for r in out.samples] == formatted
    assert [r["question"] for r in out.samples] == [p.question for p in problems]
    # accuracy 4/7 with sd sqrt((4 (3/7)^2 + 3 (4/7)^2) / 6) = sqrt(2/7), se = sqrt(2/7) / sqrt(7)
    se = math.sqrt(2 / 7) / math.sqrt(7)
    assert out.metrics == pytest.approx({"eval/arithmetic/accuracy": 4 / 7, "eval/arithmetic/accuracy_stderr": se,
                                         "eval/arithmetic/format_rate": 4 / 7, "eval/arithmetic/format_rate_stderr": se})
    assert [r["value"] for r in out.items if r["metric"] == "eval/arithmetic/accuracy"] == correct


def test_passk_bookkeeping_by_hand(corpus: Path, pretrained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    problems = load_problems(corpus, "test")[:5]
    right_of = {p.question: i for i, p in enumerate(problems)}  # problem i: i of its 4 samples right
    answer_of = {p.question: p.answer for p in problems}

    def fake_sample(model, tokenizer, prompts, *, n, max_new_tokens, temperature, seed=0):
        questions = [re.fullmatch(r"<\|user\|>(.*)<\|end\|><\|assistant\|>", p, re.DOTALL).group(1) for p in prompts]
        if n == 1:  # the greedy pass: always wrong
            texts = ["no idea"] * len(questions)
        else:  # each prompt's n samples in a row, as rollout.sample returns them
            texts = [f"<answer>{answer_of[q]}</answer>" if s < right_of[q] else "<answer>-1</answer>"
                     for q in questions for s in range(n)]
        return Samples(prompts=[[0]] * len(texts), completions=[[0]] * len(texts), texts=texts)

    monkeypatch.setattr(evaluate, "sample", fake_sample)
    cfg = EvaluateConfig(checkpoint=pretrained.checkpoint, dataset=corpus, output_dir=Path("unused"), batch_size=8,
                         passk_samples=4, passk_k=(1, 2, 4), passk_temperatures=(1.0,), progress=False)
    out = evaluate.arithmetic_task(cfg, None, ckpt.load_tokenizer(pretrained.checkpoint), problems)
    # n = 4 samples, c = 0..4 right. pass@k = 1 - C(4-c, k) / C(4, k):
    #   k=1: 0, 1/4, 2/4, 3/4, 1                      mean 0.5
    #   k=2: 0, 1 - 3/6, 1 - 1/6, 1 (4-c < k), 1      mean (0 + 0.5 + 5/6 + 1 + 1) / 5 = 2/3
    #   k=4: 0, 1, 1, 1, 1                            mean 0.8
    per_item = {k: [r["value"] for r in out.items if r["metric"] == f"eval/arithmetic/pass_at_{k}_t1"] for k in (1, 2, 4)}
    assert per_item == {1: pytest.approx([0, 0.25, 0.5, 0.75, 1]), 2: pytest.approx([0, 0.5, 5 / 6, 1, 1]),
                        4: pytest.approx([0, 1, 1, 1, 1])}
    assert out.metrics["eval/arithmetic/pass_at_1_t1"] == pytest.approx(0.5)
    assert out.metrics["eval/arithmetic/pass_at_2_t1"] == pytest.approx(2 / 3)
    assert out.metrics["eval/arithmetic/pass_at_4_t1"] == pytest.approx(0.8)
    # sd of (0, 1, 1, 1, 1) = sqrt((0.8^2 + 4 * 0.2^2) / 4) = sqrt(0.2); se = sqrt(0.2 / 5) = 0.2
    assert out.metrics["eval/arithmetic/pass_at_4_t1_stderr"] == pytest.approx(0.2)
    assert out.metrics["eval/arithmetic/accuracy"] == 0.0


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"real GSM8K data not found at {GSM8K_TRAIN}")
def test_gsm8k_pipeline_on_real_data(corpus: Path, sft_trained: Trained, tmp_path: Path) -> None:
    cfg = EvaluateConfig(checkpoint=sft_trained.checkpoint, dataset=corpus, output_dir=tmp_path, tasks=("gsm8k",),
                         gsm8k_files=(GSM8K_TRAIN,), limit=3, gsm8k_max_new_tokens=8, progress=False)
    result = evaluate.run(cfg)
    items = read_items(result.items)
    assert list(items["eval/gsm8k/accuracy"]) == ["train:1", "train:2", "train:3"]
    assert 0 <= result.metrics["eval/gsm8k/accuracy"] <= 1 and "eval/gsm8k/accuracy_stderr" in result.metrics
    samples = json.loads(result.report.read_text())["samples"]["gsm8k"]
    assert [s["answer"] for s in samples] == ["72", "10", "5"]


def test_harness_tasks_go_to_stages_harness(corpus: Path, sft_trained: Trained, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import stages

    calls = []

    def fake_evaluate(checkpoint, tasks, *, include_path=None, limit=None, device="cpu"):
        calls.append((checkpoint, tasks, include_path, limit))
        return ({"eval/hs/acc": 0.5, "eval/hs/acc_stderr": 0.5},
                [{"metric": "eval/hs/acc", "item": "hs:0", "value": 1.0}, {"metric": "eval/hs/acc", "item": "hs:1", "value": 0.0}])

    stub = types.SimpleNamespace(evaluate=fake_evaluate)
    monkeypatch.setitem(sys.modules, "stages.harness", stub)
    monkeypatch.setattr(stages, "harness", stub, raising=False)
    cfg = EvaluateConfig(checkpoint=sft_trained.checkpoint, dataset=corpus, output_dir=tmp_path, tasks=(),
                         harness_tasks=("hs",), harness_include=tmp_path / "yamls", limit=2, progress=False)
    result = evaluate.run(cfg)
    assert calls == [(sft_trained.checkpoint, ["hs"], tmp_path / "yamls", 2)]
    assert result.metrics == {"eval/hs/acc": 0.5, "eval/hs/acc_stderr": 0.5}
    assert read_items(result.items) == {"eval/hs/acc": {"hs:0": 1.0, "hs:1": 0.0}}


# --- helpers ---------------------------------------------------------------------------------


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_meta(checkpoint: Path, change) -> None:
    meta = ckpt.read_meta(checkpoint)
    change(meta)
    (checkpoint / ckpt.META).write_text(json.dumps(meta))
