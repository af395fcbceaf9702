"""The tokenize stage and the token-shard loader: exact round trip, index, split, verification, sharding, resume."""

from __future__ import annotations

import doctest
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from stages import token_shards, tokenize
from stages.dataset import file_digest, is_heldout, read_dataset, write_dataset
from stages.token_shards import ShardError, TokenShards, doc_starts
from stages.tokenize import TokenizeConfig, token_dtype, tokenizer_hash
from stages.tokenizer import DOC_SEPARATOR, train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
WORDS = ("the", "king", "hath", "spoken", "naïve", "café", "über", "🙂", "of", "time", "and", "sea", "\n", "ß")


def documents(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = [{"id": f"doc-{i}", "source": "synthetic",
             "text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 60))).tolist())} for i in range(n)]
    recs[3]["text"] = None  # unusable: quarantined
    recs[4]["text"] = ""  # empty: skipped
    return recs


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tokenize")
    recs = documents(300)
    write_dataset(recs, root / "dataset", shard_rows=120)  # 3 shards
    tok = train_tokenizer([r["text"] for r in recs if r["text"]], vocab_size=400, min_frequency=1)
    tok.save_pretrained(root / "tok")
    cfg = TokenizeConfig(dataset=root / "dataset", tokenizer=root / "tok", output_dir=root / "out",
                         heldout_fraction=0.2)
    return {"root": root, "recs": recs, "cfg": cfg, "result": tokenize.run(cfg)}


def pickling_map(fn, items):
    """`map`, but every call crosses a pickle as it would into a Ray task or a process pool."""
    return map(pickle.loads(pickle.dumps(fn)), [pickle.loads(pickle.dumps(i)) for i in items])


def test_doctests() -> None:
    for module in (tokenize, token_shards):
        assert doctest.testmod(module).failed == 0, module.__name__


def split_texts(recs: list[dict], fraction: float) -> dict[str, list[str]]:
    kept = [r for r in recs if r["text"]]
    return {"train": [r["text"] for r in kept if not is_heldout(r["id"], fraction)],
            "heldout": [r["text"] for r in kept if is_heldout(r["id"], fraction)]}


def decoded_docs(shards: TokenShards, tokenizer) -> list[str]:
    """Each document's tokens (its separator checked and dropped) decoded back to text."""
    bounds = [*shards.doc_starts.tolist(), len(shards)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        ids = shards.read(lo, hi)
        assert ids[-1] == shards.separator_id and shards.separator_id not in ids[:-1]
        out.append(tokenizer.decode(ids[:-1].tolist()))
    return out


def test_round_trip_split_and_index(small: dict) -> None:
    cfg, result = small["cfg"], small["result"]
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    expected = split_texts(small["recs"], cfg.heldout_fraction)
    assert expected["heldout"] and expected["train"]
    for split in ("train", "heldout"):
        shards = TokenShards(cfg.output_dir, split=split)
        assert decoded_docs(shards, tok) == expected[split]  # byte-exact, in dataset order
        assert len(shards) == sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in expected[split])
        shards.verify()

    index = json.loads((result.tokens / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == len(tok)
    assert index["separator_id"] == tok.convert_tokens_to_ids(DOC_SEPARATOR)
    assert index["tokenizer_hash"] == tokenizer_hash(cfg.tokenizer)
    train = index["splits"]["train"]
    assert [s["file"] for s in train["shards"]] == [f"train/tokens-{k:05d}.bin" for k in range(3)]
    for s in train["shards"]:
        assert (result.tokens / s["file"]).stat().st_size == 2 * s["n_tokens"]
        assert s["md5"] == file_digest(result.tokens / s["file"])
        assert np.load(result.tokens / s["docs"])[0] == 0
    assert train["n_docs"] == len(expected["train"]) and result.metrics["data/docs/heldout"] == len(expected["heldout"])
    assert result.metrics["data/tokens/train"] == train["n_tokens"]
    counts = TokenShards(cfg.output_dir).token_counts()
    assert counts.sum() == train["n_tokens"] and counts[index["separator_id"]] == train["n_docs"]

    report = json.loads(result.report.read_text())
    assert report["splits"]["train"]["n_tokens"] == train["n_tokens"] and report["fingerprint"]
    quarantine = [json.loads(line) for line in result.quarantine.read_text().splitlines()]
    assert [q["id"] for q in quarantine] == ["doc-3"] and result.metrics["data/tokenize/empty"] == 1


def test_unchanged_rerun_is_a_noop_and_shards_are_reused(small: dict) -> None:
    cfg = small["cfg"]
    index = small["result"].tokens / "index.json"
    before = index.stat().st_mtime_ns
    calls = []
    again = tokenize.run(cfg, mapper=lambda fn, items: calls.append(1) or map(fn, items))
    assert again.metrics == small["result"].metrics and not calls and index.stat().st_mtime_ns == before

    # A run killed after its workers finished (no report): the shards are not tokenized again.
    text_before = index.read_text()
    small["result"].report.unlink()
    tokenize.run(cfg)
    assert json.loads(small["result"].report.read_text())["shards_reused"] == 3 and index.read_text() == text_before


def test_dtype_by_vocabulary_size(tmp_path: Path) -> None:
    assert token_dtype(65_535) == np.uint16 and token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    # End to end with a vocabulary past uint16: a word-level tokenizer over 70,000 made-up words.
    vocab = {DOC_SEPARATOR: 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=DOC_SEPARATOR, unk_token="[UNK]").save_pretrained(
        tmp_path / "tok")
    texts = ["w69999 w3 w65600", "w1 w70000", "w65535 w65536 w65537"]  # w70000 is unknown
    write_dataset([{"id": f"d{i}", "text": t, "source": "s"} for i, t in enumerate(texts)], tmp_path / "data")
    result = tokenize.run(TokenizeConfig(dataset=tmp_path / "data", tokenizer=tmp_path / "tok",
                                         output_dir=tmp_path / "out", heldout_fraction=0.0), mapper=pickling_map)
    shards = TokenShards(result.tokens)
    assert shards.dtype == np.uint32 and shards.index["vocab_size"] == 70_002
    assert shards.read(0, len(shards)).tolist() == [70_001, 5, 65_602, 0, 3, 1, 0, 65_537, 65_538, 65_539, 0]
    assert shards.index["splits"]["heldout"]["shards"] == []


def test_truncated_or_missing_shard_is_a_clear_error(small: dict, tmp_path: Path) -> None:
    import shutil

    tokens = tmp_path / "tokens"
    shutil.copytree(small["result"].tokens, tokens)
    shard = json.loads((tokens / "index.json").read_text())["splits"]["train"]["shards"][1]
    path = tokens / shard["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2 * 7])  # a copy cut 7 tokens short
    with pytest.raises(ShardError, match="truncated") as err:
        TokenShards(tokens)
    message = str(err.value)
    assert str(path) in message and f"{shard['n_tokens']:,} tokens" in message and f"{shard['n_tokens'] - 7:,}" in message
    path.unlink()
    with pytest.raises(ShardError, match="missing"):
        TokenShards(tokens)
    (tokens / "index.json").unlink()  # what a writer killed before its last step leaves
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenShards(tokens)


def seq_len_for(shards: TokenShards, batch_size: int) -> int:
    """A seq_len whose epoch is a whole number of steps, so one epoch's batches are exactly its windows."""
    return next(L for L in range(16, 64) if shards.windows_per_epoch(L) % batch_size == 0)


def test_two_ranks_are_disjoint_and_cover_the_epoch(small: dict) -> None:
    shards = TokenShards(small["cfg"].output_dir)
    B = 4
    L = seq_len_for(shards, B)
    n = shards.windows_per_epoch(L)
    steps = n // B
    assert steps >= 5
    seen = {r: [] for r in range(2)}
    for r in range(2):
        for step, batch in enumerate(shards.batches(L, B, rank=r, world=2, seed=7, num_steps=steps)):
            global_batch = shards.batch_at(step, L, B, seed=7)
            for key, value in batch.items():  # the rows stages.train_loop hands this rank
                np.testing.assert_array_equal(value, global_batch[key][r::2])
            for w, x, y in zip(batch["window_index"], batch["input_ids"], batch["targets"], strict=True):
                np.testing.assert_array_equal(x, shards.read(w * L, w * L + L))
                np.testing.assert_array_equal(y, shards.read(w * L + 1, w * L + L + 1))
            seen[r] += batch["window_index"].tolist()
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(n))  # each window of the epoch exactly once
    assert seen[0] + seen[1] != sorted(seen[0] + seen[1])  # shuffled, not read in order
    # The next epoch is another order of the same windows.
    nxt = np.concatenate([shards.batch_at(s, L, B, seed=7)["window_index"] for s in range(steps, 2 * steps)])
    assert sorted(nxt.tolist()) == list(range(n)) and nxt.tolist() != np.concatenate(
        [shards.batch_at(s, L, B, seed=7)["window_index"] for s in range(steps)]).tolist()


def test_resume_at_step_k_continues_exactly(small: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = TokenShards(small["cfg"].output_dir)
    L, B, k = 24, 6, 5
    steps = shards.windows_per_epoch(L) // B + 4  # across an epoch boundary
    full = list(shards.batches(L, B, rank=1, world=2, seed=3, num_steps=steps))
    monkeypatch.setattr(token_shards, "MAX_MAPS", 1)  # the resumed reader keeps remapping its shards
    resumed = list(TokenShards(small["cfg"].output_dir).batches(L, B, rank=1, world=2, seed=3, start_step=k,
                                                                num_steps=steps - k))
    assert len(resumed) == steps - k
    for a, b in zip(full[k:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other_seed = shards.batch_at(k, L, B, seed=4, rank=1, world=2)
    assert not np.array_equal(other_seed["window_index"], full[k]["window_index"])


def test_segments_and_positions_follow_document_boundaries(small: dict) -> None:
    shards = TokenShards(small["cfg"].output_dir)
    L = 48
    batch = shards.batch_at(0, L, 16, seed=0)
    assert all(v.dtype == np.int64 and v.flags.c_contiguous for v in batch.values())  # torch.from_numpy(v).view(-1)
    starts = set(shards.doc_starts.tolist())
    crossed = 0
    for w, seg, pos, x in zip(batch["window_index"], batch["segment_ids"], batch["position_ids"], batch["input_ids"],
                              strict=True):
        boundaries = [i for i in range(1, L) if w * L + i in starts]
        assert doc_starts(seg).tolist() == boundaries and seg[0] == 0
        assert all(pos[i] == 0 for i in boundaries) and pos[0] == 0
        assert all(x[i - 1] == shards.separator_id for i in boundaries)  # each document ends with the separator
        crossed += bool(boundaries)
        assert np.all((np.diff(pos) == 1) | (pos[1:] == 0))
    assert crossed  # the windows do pack several documents


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="heldout_fraction"):
        TokenizeConfig(dataset=Path("d"), tokenizer=Path("t"), output_dir=Path("o"), heldout_fraction=0.5)
    with pytest.raises(ValueError, match="batch_rows"):
        TokenizeConfig(dataset=Path("d"), tokenizer=Path("t"), output_dir=Path("o"), batch_rows=0)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")
def test_tinyshakespeare(tmp_path: Path) -> None:
    speeches = [s for s in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    write_dataset(({"id": f"tinyshakespeare:{i}", "text": t, "source": "tinyshakespeare"}
                   for i, t in enumerate(speeches)), tmp_path / "data", shard_rows=3000)
    tok = train_tokenizer(speeches, vocab_size=1024)
    tok.save_pretrained(tmp_path / "tok")
    result = tokenize.run(TokenizeConfig(dataset=tmp_path / "data", tokenizer=tmp_path / "tok",
                                         output_dir=tmp_path / "out"))
    df = read_dataset(tmp_path / "data")
    held = df["id"].map(lambda i: is_heldout(i, 0.02))
    train, heldout = TokenShards(result.tokens), TokenShards(result.tokens, "heldout")
    assert len(train.index["splits"]["train"]["shards"]) == len(list((tmp_path / "data").glob("*.parquet"))) > 2
    assert decoded_docs(heldout, tok) == df.loc[held, "text"].tolist()
    assert train.doc_starts.size == (~held).sum() and 2.0 < result.metrics["data/tokenize/chars_per_token"] < 6.0
    batch = train.batch_at(10, 256, 8, seed=0, rank=1, world=2)
    assert batch["input_ids"].shape == (4, 256) and batch["input_ids"].max() < train.vocab_size
    assert tok.decode(batch["targets"][0, :-1].tolist()) == tok.decode(batch["input_ids"][0, 1:].tolist())
