"""The mix stage: shares of a token budget, epoch caps, deterministic sampling, evaluation rows untouched."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest

from stages import mix
from stages.dataset import read_dataset, write_dataset
from stages.mix import MixConfig, base_id, estimate_tokens
from stages.tracking import RecordingTracker


def corpus(path: Path, docs: dict[str, int], words: int = 60, shard_rows: int = 700) -> Path:
    """Sources with `docs[source]` documents each, lengths varying so shares are not row counts."""
    records = []
    for source, n in docs.items():
        for i in range(n):
            length = words // 2 + (i * 7919) % words  # 30..89 words: documents of unequal size
            records.append({"id": f"{source}/{i}", "text": " ".join(f"w{i}x{j}" for j in range(length)),
                            "source": source, "meta": {}})
    for i in range(50):  # the arithmetic test split the evaluate stage reads
        records.append({"id": f"arith/test/{i}", "text": f"What is {i} plus {i}? It is {2 * i}.",
                        "source": "arithmetic", "meta": {"split": "test"}})
    for i in range(200):
        records.append({"id": f"arith/train/{i}", "text": f"What is {i} times 2? It is {2 * i}.",
                        "source": "arithmetic", "meta": {"split": "train"}})
    write_dataset(records, path, shard_rows=shard_rows)
    return path


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corpus(tmp_path_factory.mktemp("mixin") / "dataset",
                  {"folder:web": 2000, "folder:books": 300, "file:code": 100})


def tokens_by_source(dataset: Path) -> dict[str, int]:
    df = read_dataset(dataset)
    df = df[~df["meta"].str.contains('"split": "test"')]
    return df.groupby("source")["text"].apply(lambda t: sum(estimate_tokens(x) for x in t)).to_dict()


def test_doctests() -> None:
    assert doctest.testmod(mix).failed == 0


def test_shares_reach_their_targets_subsampling_and_repeating(three_sources: Path, tmp_path: Path) -> None:
    weights = {"folder:web": 0.6, "folder:books": 0.25, "file:*": 0.1}  # arithmetic unlisted: natural share
    tokens_in = tokens_by_source(three_sources)
    total_in = sum(tokens_in.values())
    target = total_in // 2
    tracker = RecordingTracker()
    result = mix.run(MixConfig(input_dir=three_sources, output_dir=tmp_path, weights=weights, target_tokens=target),
                     tracker)
    out = tokens_by_source(result.dataset)
    total_out = sum(out.values())
    assert abs(total_out - target) / target < 0.01
    natural_arith = tokens_in["arithmetic"] / total_in
    free = 1 - natural_arith
    expected = {"folder:web": free * 0.6 / 0.95, "folder:books": free * 0.25 / 0.95, "file:code": free * 0.1 / 0.95,
                "arithmetic": natural_arith}
    for source, share in expected.items():
        assert out[source] / total_out == pytest.approx(share, abs=0.01), source
    report = json.loads(result.report.read_text())
    table = report["mixture"]
    assert table["folder:web"]["epochs"] < 1 < table["folder:books"]["epochs"]  # one subsampled, one repeated
    for source, share in expected.items():
        assert table[source]["target_share"] == pytest.approx(share)
        assert table[source]["actual_share"] == pytest.approx(out[source] / total_out)
        assert table[source]["tokens_in"] == tokens_in[source]
    assert result.expected_mixture == pytest.approx(expected)
    assert result.metrics["data/mix/folder_web/share"] == pytest.approx(out["folder:web"] / total_out)
    assert result.metrics["data/mix/tokens_out"] == total_out
    assert report["dropped"]["subsampled"] > 0 and report["fingerprint"]
    assert result.plot.stat().st_size > 5000 and tracker.series("data/mix/tokens_out") == [total_out]
    # Repeats are distinct ids pointing back at their original.
    df = read_dataset(result.dataset)
    assert df["id"].is_unique
    books = df[df["source"] == "folder:books"]
    assert books["id"].str.contains("#epoch2").any()
    assert set(books["id"].map(base_id)) <= {f"folder:books/{i}" for i in range(300)}


def test_epoch_cap_limits_a_small_source(three_sources: Path, tmp_path: Path) -> None:
    total_in = sum(tokens_by_source(three_sources).values())
    cfg = MixConfig(input_dir=three_sources, output_dir=tmp_path, target_tokens=total_in,
                    weights={"file:code": 0.5, "folder:web": 0.5}, unlisted="drop", max_epochs=10,
                    epochs={"file:*": 2})
    result = mix.run(cfg)
    df = read_dataset(result.dataset)
    code = df[df["source"] == "file:code"]
    # Wanted about 25x its tokens; the cap allows exactly two copies of every document.
    assert len(code) == 200 and code["id"].map(base_id).value_counts().eq(2).all()
    row = json.loads(result.report.read_text())["mixture"]["file:code"]
    assert row["capped"] and row["epochs"] == pytest.approx(2.0)
    assert row["actual_share"] < row["target_share"]
    assert json.loads(result.report.read_text())["shortfall_tokens"] > 0
    # unlisted=drop: books and the arithmetic training rows are gone, the test rows are not.
    assert set(df["source"]) == {"file:code", "folder:web", "arithmetic"}
    assert (df[df["source"] == "arithmetic"]["meta"].str.contains('"test"')).all()


def test_sampling_is_deterministic_and_seeded(three_sources: Path, tmp_path: Path) -> None:
    total_in = sum(tokens_by_source(three_sources).values())

    def ids(out: str, seed: int) -> list[str]:
        cfg = MixConfig(input_dir=three_sources, output_dir=tmp_path / out, target_tokens=total_in // 3, seed=seed,
                        weights={"folder:web": 0.8, "folder:books": 0.2})
        return read_dataset(mix.run(cfg).dataset)["id"].tolist()

    first, again, other = ids("a", 0), ids("b", 0), ids("c", 1)
    assert first == again
    assert set(first) != set(other)
    assert abs(len(first) - len(other)) < 0.05 * len(first)  # another sample of the same size


def test_unchanged_rerun_is_a_noop(three_sources: Path, tmp_path: Path) -> None:
    cfg = MixConfig(input_dir=three_sources, output_dir=tmp_path, target_tokens=50_000)
    first = mix.run(cfg)
    shard = next(first.dataset.glob("*.parquet"))
    mtime = shard.stat().st_mtime_ns
    second = mix.run(cfg)
    assert second == first and shard.stat().st_mtime_ns == mtime


def test_evaluation_rows_are_never_dropped_or_repeated(three_sources: Path, tmp_path: Path) -> None:
    for name, cfg in {
        "shrink": dict(target_tokens=2000, weights={"folder:web": 1.0}),  # far below the corpus
        "grow": dict(target_tokens=10_000_000, weights={"arithmetic": 1.0}, unlisted="drop"),
        "zero": dict(target_tokens=10_000, weights={"arithmetic": 0.0, "folder:web": 1.0}),
    }.items():
        result = mix.run(MixConfig(input_dir=three_sources, output_dir=tmp_path / name, **cfg))
        df = read_dataset(result.dataset)
        tests = df[df["meta"].str.contains('"split": "test"')]
        assert sorted(tests["id"]) == sorted(f"arith/test/{i}" for i in range(50)), name
        report = json.loads(result.report.read_text())
        assert report["protected"]["arithmetic"]["docs"] == 50
    grown = read_dataset(tmp_path / "grow" / "dataset")
    assert grown["id"].str.contains("arith/train/.*#epoch4", regex=True).any()  # training rows do repeat


def test_no_budget_keeps_everything_and_reports_weights(three_sources: Path, tmp_path: Path) -> None:
    result = mix.run(MixConfig(input_dir=three_sources, output_dir=tmp_path, weights={"folder:web": 0.5, "folder:books": 0.5}))
    before, after = read_dataset(three_sources), read_dataset(result.dataset)
    assert sorted(before["id"]) == sorted(after["id"])
    table = json.loads(result.report.read_text())["mixture"]
    assert table["folder:books"]["target_share"] > table["folder:books"]["actual_share"]
    assert table["folder:web"]["target_share"] < table["folder:web"]["actual_share"]
    assert result.expected_mixture == {}


def test_llama_table_on_connector_names(tmp_path: Path) -> None:
    names = ["folder:web", "file:c4", "folder:code", "file:wikipedia", "folder:books", "file:arxiv", "file:qa"]
    data = corpus(tmp_path / "in", dict.fromkeys(names, 400))
    budget = 300_000
    result = mix.run(MixConfig(input_dir=data, output_dir=tmp_path / "out", weights=mix.LLAMA_WEIGHTS,
                               epochs=mix.LLAMA_EPOCHS, target_tokens=budget, unlisted="drop"))
    table = json.loads(result.report.read_text())["mixture"]
    assert table["folder:web"]["target_share"] == pytest.approx(0.67)
    assert table["file:qa"]["target_share"] == pytest.approx(0.02)
    # Web wants 67 % of the budget but may be seen 1.1 times at most: the cap binds.
    assert table["folder:web"]["capped"] and table["folder:web"]["epochs"] <= 1.1 + 1e-3


def test_with_a_tokenizer_directory(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    data = corpus(tmp_path / "in", {"folder:a": 200, "folder:b": 200})
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(read_dataset(data)["text"].tolist()[:50],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    result = mix.run(MixConfig(input_dir=data, output_dir=tmp_path / "out", tokenizer=tmp_path / "tok",
                               weights={"folder:a": 0.75, "folder:b": 0.25}, unlisted="drop", target_tokens=40_000))
    report = json.loads(result.report.read_text())
    assert report["token_counter"] == "tokenizer"
    assert report["mixture"]["folder:a"]["actual_share"] == pytest.approx(0.75, abs=0.01)
    # A whitespace-split BPE of 300 tokens gives other counts than the byte estimate.
    assert report["mixture"]["folder:a"]["tokens_in"] != sum(
        estimate_tokens(t) for t in read_dataset(data, ["folder:a"])["text"])


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    for kwargs, field in [({"weights": {"a": -1}}, "weights.a"), ({"weights": {"a": 0}}, "weights"),
                          ({"target_tokens": -5}, "target_tokens"), ({"max_epochs": 0}, "max_epochs"),
                          ({"epochs": {"x": 0}}, "epochs.x"), ({"unlisted": "natural"}, "unlisted")]:
        with pytest.raises(ValueError, match=field):
            MixConfig(input_dir=tmp_path, output_dir=tmp_path, **kwargs)


@pytest.mark.slow  # about 30 s, nearly all of it Ray starting on 2 cores
def test_with_ray_mapper(three_sources: Path, tmp_path: Path) -> None:
    """The same mixture when each shard's count and sample are Ray tasks (workers in another directory)."""
    ray = pytest.importorskip("ray")
    ray_map = pytest.importorskip("infra.ray_map")
    started_here = not ray.is_initialized()
    cfg = MixConfig(input_dir=three_sources, output_dir=tmp_path / "ray", target_tokens=60_000,
                    weights={"folder:web": 0.5, "folder:books": 0.5})
    local = mix.run(MixConfig(**{**cfg.__dict__, "output_dir": tmp_path / "local"}))
    try:
        distributed = mix.run(cfg, mapper=ray_map.mapper())
    finally:
        if started_here:
            ray.shutdown()
    assert read_dataset(distributed.dataset)["id"].tolist() == read_dataset(local.dataset)["id"].tolist()
