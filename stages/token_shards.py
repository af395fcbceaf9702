"""Read the `tokenize` stage's shards: memory-mapped, verified, packed into windows, sharded over ranks.

    shards = TokenShards(tokenize_output_dir)            # or its tokens/ folder; split="heldout" too
    batch = shards.batch_at(step, seq_len=1024, batch_size=64, seed=0)   # the global batch of a step
    for batch in shards.batches(1024, 64, rank=r, world=w, seed=0, start_step=s): ...

The split's shards read as one token stream (documents back to back, each ending with the
separator). Window `i` of an epoch is tokens `[i*seq_len, i*seq_len + seq_len + 1)`: inputs and
their next tokens, packed across document (and shard) boundaries with no padding, consecutive
windows sharing one token so every token but the first is a target exactly once per epoch. Epoch
`e` visits the windows in a permutation seeded by `(seed, e)`; global sample `j` is position
`j mod n` of epoch `j div n`, and step `s` is samples `[s*B, (s+1)*B)`. A batch is therefore a pure
function of `(seed, step)`: a run resumed at `start_step` gets exactly the batches an uninterrupted
run would have, whatever the world size. Rank `r` of `w` takes rows `r, r+w, ...` of the global
batch, the rows `stages.train_loop` gives that rank: ranks are disjoint and together cover every
window of an epoch once.

A batch is a dict of int64 arrays with a leading batch dimension (`torch.from_numpy` each):
`input_ids` and `targets` (the next tokens, already shifted: do not let a model shift them again),
`segment_ids` (the index of each input token's document within its row, 0 for the first, so a
document-causal attention mask is `causal & (seg[:, :, None] == seg[:, None, :])`), `position_ids`
(restarting at 0 at each document start), and `window_index`. Pretraining (`stages.pretrain`)
feeds only `input_ids` and `targets`: packed documents attend across boundaries there (why:
`stages.pretrain.shard_batch`); the segment and position ids are for a consumer that masks.

Opening checks every shard's size and reads its document offsets (8 bytes per document, held for
the reader's life); tokens are mapped on first read, at most MAX_MAPS shards at a time. The window
permutation is held for one epoch at a time (8 bytes per window: 40 MB for 10 B tokens at 2048).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "index.json"
MAX_MAPS = 256  # open shard maps per reader: thousands of shards must not exhaust the descriptor limit


class ShardError(ValueError):
    """A token shard does not match its index (truncated, too long, missing): the message names the file."""


def index_dir(path: Path) -> Path:
    """The folder holding index.json: `path` itself or the `tokens/` folder of a tokenize output_dir."""
    path = Path(path)
    for candidate in (path, path / "tokens"):
        if (candidate / INDEX).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {INDEX} (not a finished tokenize output: the index is written last)")


class TokenShards:
    """One split of a tokenize output, memory-mapped read-only and checked against its index on open."""

    def __init__(self, path: Path, split: str = "train") -> None:
        self.root = index_dir(path)
        self.index: dict[str, Any] = json.loads((self.root / INDEX).read_text())
        if split not in self.index["splits"]:
            raise ValueError(f"split={split!r}: {self.root / INDEX} has {', '.join(self.index['splits'])}")
        self.split = split
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size: int = self.index["vocab_size"]
        self.separator_id: int = self.index["separator_id"]
        self.tokenizer_hash: str = self.index["tokenizer_hash"]
        self._shards: list[dict[str, Any]] = self.index["splits"][split]["shards"]
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        starts = []
        offset = 0
        self._offsets = [0]
        for shard in self._shards:
            self._check(shard)
            docs = np.load(self.root / shard["docs"])
            if docs.shape != (shard["n_docs"],):
                raise ShardError(f"{self.root / shard['docs']}: {docs.shape[0]} document offsets, "
                                 f"{INDEX} says {shard['n_docs']}")
            starts.append(docs.astype(np.int64) + offset)
            offset += shard["n_tokens"]
            self._offsets.append(offset)
        self.n_tokens = offset
        self.doc_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        self._order: tuple[tuple[int, int, int], np.ndarray] | None = None

    def _check(self, shard: dict[str, Any]) -> None:
        f = self.root / shard["file"]
        expected = shard["n_tokens"]
        if not f.is_file():
            raise ShardError(f"{f}: missing ({INDEX} lists it with {expected:,} tokens)")
        size = f.stat().st_size
        if size != expected * self.dtype.itemsize:
            what = "truncated" if size < expected * self.dtype.itemsize else "longer than its index says"
            raise ShardError(f"{f}: {what}: {INDEX} says {expected:,} tokens, the file holds "
                             f"{size / self.dtype.itemsize:,.1f} ({size:,} bytes of {self.dtype.name})")

    def _tokens(self, k: int) -> np.ndarray:
        """Shard k's memory map; at most MAX_MAPS stay open (each holds a file descriptor)."""
        if k in self._maps:
            self._maps.move_to_end(k)
        else:
            shard = self._shards[k]
            self._maps[k] = np.memmap(self.root / shard["file"], dtype=self.dtype, mode="r",
                                      shape=(shard["n_tokens"],))
            if len(self._maps) > MAX_MAPS:
                self._maps.popitem(last=False)
        return self._maps[k]

    def token_counts(self) -> np.ndarray:
        """Unigram counts of the training split (for the baseline perplexity), vocab_size long."""
        return np.load(self.root / self.index["token_counts"])

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` of the split's stream as int64, across shard boundaries."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside [0, {self.n_tokens})")
        parts = []
        k = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < stop:
            lo = self._offsets[k]
            hi = min(stop, self._offsets[k + 1])
            parts.append(self._tokens(k)[start - lo : hi - lo])
            start = hi
            k += 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def verify(self) -> None:
        """Compare every shard's md5 with the index (reads every byte; opening checks sizes only)."""
        from stages.dataset import file_digest

        for shard in self.index["splits"][self.split]["shards"]:
            if file_digest(self.root / shard["file"]) != shard["md5"]:
                raise ShardError(f"{self.root / shard['file']}: md5 differs from {INDEX}'s")

    def windows_per_epoch(self, seq_len: int) -> int:
        return max(0, (self.n_tokens - 1) // seq_len)

    def epoch_order(self, seq_len: int, seed: int, epoch: int) -> np.ndarray:
        """The window indices of `epoch` in visiting order (a seeded permutation)."""
        key = (seq_len, seed, epoch)
        if self._order is None or self._order[0] != key:
            self._order = key, np.random.default_rng([seed, epoch]).permutation(self.windows_per_epoch(seq_len))
        return self._order[1]

    def window_indices(self, step: int, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                       world: int = 1) -> np.ndarray:
        """Which windows rank `rank` of `world` reads at `step`: rows rank, rank+world, ... of the global batch."""
        n = self.windows_per_epoch(seq_len)
        if n == 0:
            raise ValueError(f"{self.root}: {self.split} has {self.n_tokens} tokens, no window of seq_len+1={seq_len + 1}")
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} outside world={world}")
        if batch_size < world:
            raise ValueError(f"batch_size={batch_size} leaves ranks of world={world} without rows")
        samples = step * batch_size + np.arange(rank, batch_size, world, dtype=np.int64)
        out = np.empty(samples.size, dtype=np.int64)
        for epoch in np.unique(samples // n):  # a step straddles at most two epochs unless batch > epoch
            here = samples // n == epoch
            out[here] = self.epoch_order(seq_len, seed, int(epoch))[samples[here] % n]
        return out

    def batch_at(self, step: int, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world: int = 1) -> dict[str, np.ndarray]:
        """The rows of `step`'s batch that belong to `rank` (all of them with the default world=1)."""
        windows = self.window_indices(step, seq_len, batch_size, seed, rank, world)
        rows = np.stack([self.read(w * seq_len, w * seq_len + seq_len + 1) for w in windows])
        pos = windows[:, None] * seq_len + np.arange(seq_len)  # stream offsets of the input tokens
        doc = np.searchsorted(self.doc_starts, pos, side="right") - 1  # document of each input token
        doc_start = np.maximum(self.doc_starts[np.maximum(doc, 0)], windows[:, None] * seq_len)
        # Contiguous copies: views of one array would reach torch with strides that `.view` refuses.
        return {"input_ids": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:]),
                "segment_ids": doc - doc[:, :1], "position_ids": pos - doc_start, "window_index": windows}

    def batches(self, seq_len: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """`batch_at` for steps start_step, start_step+1, ... (forever, epoch after epoch, or `num_steps`)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch_at(step, seq_len, batch_size, seed, rank, world)
            step += 1


def doc_starts(segment_ids: np.ndarray) -> np.ndarray:
    """Positions in a row where a new document begins (0 excluded): the boundaries behind segment_ids.

    >>> doc_starts(np.array([0, 0, 1, 1, 1, 2]))
    array([2, 5])
    """
    return np.flatnonzero(np.diff(segment_ids)) + 1
