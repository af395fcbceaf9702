"""Stable, vectorised word n-gram hashing and MinHash signatures (numpy only), for dedup and decontamination.

`python -c "from stages.minhash import MinHasher; print(MinHasher().signatures(['a b c d e f'])[0].shape)"`

Every hash here is the same in every process, machine and run: words are hashed with BLAKE2b (never
Python's salted `hash()`), and every constant is derived from BLAKE2b of a fixed seed, not from a
random generator whose stream could change between numpy versions.

- A word is a run of word characters of the lowercased text (`\\w+`): punctuation and spacing do not
  make two texts differ.
- An n-gram hash is `splitmix64(sum_j word_hash[i + j] * C_j + n)` over 64-bit wrapping arithmetic:
  order-sensitive (C_j are distinct odd constants), and one numpy pass per position j for a whole
  batch of documents.
- A MinHash permutation k maps a 32-bit shingle hash x to `(a_k * x + b_k) mod 2^64 >> 32` with odd
  64-bit a_k and any b_k: the multiply-add-shift family (Dietzfelbinger), 2-universal from 32-bit keys
  to 32-bit values, so the share of equal signature entries estimates the Jaccard similarity of the
  shingle sets. All permutations of all shingles of a batch of documents are one [shingles, perms]
  product, reduced per document with `np.minimum.reduceat`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

WORD = re.compile(r"\w+")
M64 = (1 << 64) - 1
EMPTY = np.uint32(0xFFFFFFFF)  # the signature entry of a document with no shingle
# Shingles x permutations per numpy product: 2^22 uint64 = 32 MB of temporaries, whatever the document sizes.
CHUNK_ELEMENTS = 1 << 22


def constants(seed: int, count: int, label: str) -> np.ndarray:
    """`count` 64-bit constants derived from BLAKE2b(seed, label, i): identical everywhere.

    >>> constants(1, 2, "x").tolist() == constants(1, 2, "x").tolist(), bool(constants(1, 1, "x")[0] != constants(2, 1, "x")[0])
    (True, True)
    """
    out = [int.from_bytes(hashlib.blake2b(f"{seed}:{label}:{i}".encode(), digest_size=8).digest(), "little")
           for i in range(count)]
    return np.array(out, dtype=np.uint64)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser: every input bit reaches every output bit (in place on a copy)."""
    z = np.array(z, dtype=np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def words(text: str) -> list[str]:
    """Lowercased runs of word characters.

    >>> words("To be, or NOT to-be?")
    ['to', 'be', 'or', 'not', 'to', 'be']
    """
    return WORD.findall(text.lower())


@dataclass
class WordHasher:
    """64-bit BLAKE2b of words, memoised: a corpus has far fewer distinct words than words."""

    cache: dict[str, int] = field(default_factory=dict)
    max_cache: int = 2_000_000  # about 200 MB of dict at most; cleared when full

    def __call__(self, tokens: Sequence[str]) -> np.ndarray:
        cache = self.cache
        found = [cache.get(w) for w in tokens]
        if None in found:
            if len(cache) >= self.max_cache:
                cache.clear()
            for i, h in enumerate(found):
                if h is None:
                    w = tokens[i]
                    found[i] = cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(),
                                                          "little")
        return np.array(found, dtype=np.uint64)


_MIX = constants(0, 64, "ngram") | np.uint64(1)  # odd position multipliers, shared by every n so prefixes stay comparable


def ngram_hashes(word_hash: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every contiguous n-gram of one word-hash sequence (empty when shorter than n).

    >>> h = WordHasher()
    >>> a, b = ngram_hashes(h(words("a b c d")), 2), ngram_hashes(h(words("x b c y")), 2)
    >>> len(a), int(a[1]) == int(b[1]), int(a[0]) == int(b[0]), len(ngram_hashes(h(["a"]), 2))
    (3, True, False, 0)
    """
    if n > len(_MIX):
        raise ValueError(f"n must be <= {len(_MIX)}, got {n}")
    count = len(word_hash) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.full(count, np.uint64(n), dtype=np.uint64)
    for j in range(n):
        acc += word_hash[j:j + count] * _MIX[j]
    return splitmix64(acc)


def ngram_hashes_by_length(word_hash: np.ndarray, lengths: Sequence[int]) -> dict[int, np.ndarray]:
    """`{n: ngram_hashes(word_hash, n)}` for several n at once, in max(lengths) passes instead of sum(lengths).

    The n-gram sum of n terms is the (n-1)-gram's plus one term, so each length's hashes are a prefix
    of one running sum (decontamination checks 13 words and every whole eval-text length per document).

    >>> wh = WordHasher()(words("a b c d e f g"))
    >>> got = ngram_hashes_by_length(wh, [2, 5, 9])
    >>> all(np.array_equal(got[n], ngram_hashes(wh, n)) for n in (2, 5, 9)), len(got[9])
    (True, 0)
    """
    wanted = set(lengths)
    if max(wanted, default=0) > len(_MIX):
        raise ValueError(f"n must be <= {len(_MIX)}, got {max(wanted)}")
    out = {n: np.empty(0, dtype=np.uint64) for n in wanted}
    length = len(word_hash)
    acc = np.zeros(length, dtype=np.uint64)
    for j in range(min(max(wanted, default=0), length)):
        acc[:length - j] += word_hash[j:] * _MIX[j]
        if j + 1 in wanted:
            out[j + 1] = splitmix64(acc[:length - j] + np.uint64(j + 1))
    return out


def shingles(word_hash: np.ndarray, n: int) -> np.ndarray:
    """The distinct n-gram hashes of a document; a document of 1..n-1 words is one shingle of all its words."""
    if len(word_hash) == 0:
        return np.empty(0, dtype=np.uint64)
    return np.unique(ngram_hashes(word_hash, min(n, len(word_hash))))


@dataclass(frozen=True)
class MinHasher:
    num_perm: int = 128
    shingle_size: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        if self.num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {self.num_perm}")
        if not 1 <= self.shingle_size <= len(_MIX):
            raise ValueError(f"shingle_size must be in [1, {len(_MIX)}], got {self.shingle_size}")

    def _perms(self) -> tuple[np.ndarray, np.ndarray]:
        a = constants(self.seed, self.num_perm, "a") | np.uint64(1)
        b = constants(self.seed, self.num_perm, "b")
        return a, b

    def signatures(self, texts: Sequence[str], hasher: WordHasher | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 [len(texts), num_perm] signatures, bool [len(texts)] True where a text has no word).

        A text without words gets the all-0xFFFFFFFF signature; callers must not bucket those.
        """
        hasher = hasher or WordHasher()
        a, b = self._perms()
        sig = np.full((len(texts), self.num_perm), EMPTY, dtype=np.uint32)
        empty = np.zeros(len(texts), dtype=bool)
        per_chunk = max(1, CHUNK_ELEMENTS // self.num_perm)
        pending: list[tuple[int, np.ndarray]] = []
        pending_size = 0

        def flush() -> None:
            nonlocal pending, pending_size
            if not pending:
                return
            x = np.concatenate([s for _, s in pending]) >> np.uint64(32)
            starts = np.cumsum([0] + [len(s) for _, s in pending[:-1]])
            # [perms, shingles]: the reduction runs along contiguous memory
            prod = a[:, None] * x[None, :]
            prod += b[:, None]
            prod >>= np.uint64(32)
            sig[[i for i, _ in pending]] = np.minimum.reduceat(prod, starts, axis=1).T
            pending, pending_size = [], 0

        for i, text in enumerate(texts):
            sh = shingles(hasher(words(text)), self.shingle_size)
            if len(sh) == 0:
                empty[i] = True
            elif len(sh) > per_chunk:  # one huge document: running minimum over slices
                row = sig[i]
                for lo in range(0, len(sh), per_chunk):
                    prod = (sh[lo:lo + per_chunk] >> np.uint64(32))[:, None] * a[None, :]
                    prod += b
                    prod >>= np.uint64(32)
                    np.minimum(row, prod.min(axis=0).astype(np.uint32), out=row)
            else:
                if pending_size + len(sh) > per_chunk:
                    flush()
                pending.append((i, sh))
                pending_size += len(sh)
        flush()
        return sig, empty


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 [n, bands]: one hash of each band's `rows` signature entries (band index mixed in, so
    equal values in different bands never share a bucket by accident).

    >>> s = np.array([[1, 2, 3, 4], [1, 2, 9, 4]], dtype=np.uint32)
    >>> h = band_hashes(s, 2, 2)
    >>> bool(h[0, 0] == h[1, 0]), bool(h[0, 1] == h[1, 1]), bool(h[0, 0] == band_hashes(s[:, [2, 3, 0, 1]], 2, 2)[0, 1])
    (True, False, False)
    """
    if sig.shape[1] != bands * rows:
        raise ValueError(f"bands * rows must equal num_perm: {bands} * {rows} != {sig.shape[1]}")
    mult = constants(0, rows, "band") | np.uint64(1)
    view = sig.reshape(len(sig), bands, rows).astype(np.uint64)
    acc = (view * mult).sum(axis=2, dtype=np.uint64)
    acc += np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return splitmix64(acc)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Share of equal signature entries: an unbiased estimate of the shingle sets' Jaccard similarity."""
    return float(np.mean(a == b))
