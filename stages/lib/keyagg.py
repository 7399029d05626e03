"""The numpy core of click aggregation (what ``benchmarks/click_aggregation.py`` measures): image
keys hashed to dense integer ids without a Python object per key (:class:`KeyTable`), and clicks
summed per (key, query class) in sorted packed arrays whose memory stays within a small factor of the
result (:class:`Aggregate`). ``clicklog`` reads and checks the log; this module only counts."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def hash_strings(arr: pa.Array) -> np.ndarray:
    """64-bit hashes of a string array's values, vectorised (no Python object
    per string: a dict or pandas' object hashing costs ~1 us per key here).

    h(s) = mix(len(s) + sum_w mix(word_w XOR seed_w)): ``word_w`` the w-th
    8 bytes of s (little endian, the last one zero padded), ``seed_w`` fixed
    random words, ``mix`` the splitmix64 finaliser. Equal-length strings (the
    usual keys) take a 2-D fast path computing the same function."""
    if not len(arr):
        return np.empty(0, np.uint64)
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], np.int32)[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(buffers[2], np.uint8)[offsets[0]:offsets[-1]] if buffers[2] else np.empty(0, np.uint8)
    start, lens = offsets[:-1] - offsets[0], np.diff(offsets)
    n, nwords = len(arr), (lens + 7) // 8
    seeds = _seeds(int(nwords.max(initial=0)))
    total = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        if n and len(data) and (lens == lens[0]).all():
            width = int(nwords[0])
            padded = np.zeros((n, 8 * width), np.uint8)
            padded[:, :lens[0]] = data.reshape(n, -1)
            total = _mix(padded.view("<u8") ^ seeds[:width]).sum(axis=1, dtype=np.uint64)
        elif len(data):
            first_word = np.cumsum(nwords) - nwords
            pos = np.arange(len(data)) - np.repeat(start, lens)
            word = np.repeat(first_word, lens) + pos // 8  # each byte's word, non-decreasing
            shifted = data.astype(np.uint64) << (8 * (pos % 8)).astype(np.uint64)
            words = np.add.reduceat(shifted, np.flatnonzero(np.r_[True, word[1:] != word[:-1]]))
            mixed = _mix(words ^ seeds[np.arange(len(words)) - np.repeat(first_word, nwords)])
            some = nwords > 0
            total[some] = np.add.reduceat(mixed, first_word[some])
        return _mix(total + lens.astype(np.uint64))


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips each output bit with p ~ 1/2."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


_SEEDS = np.empty(0, np.uint64)


def _seeds(n: int) -> np.ndarray:
    global _SEEDS
    if len(_SEEDS) < n:  # deterministic: the same generator extends the same sequence
        _SEEDS = np.random.default_rng(0x5EED).integers(0, 2**64, max(n, 16), np.uint64, endpoint=False)
    return _SEEDS


class KeyTable:
    """Image key -> dense integer id, in order of first appearance.

    Keys are found by their 64-bit hash in a sorted array (numpy, no Python
    object per key); each block checks that its keys equal the stored key of
    their hash, so a collision fails loudly instead of merging two images."""

    def __init__(self) -> None:
        self.hashes = np.empty(0, np.uint64)  # sorted
        self.ids = np.empty(0, np.int64)      # id of each sorted hash
        self.keys = pa.array([], pa.string())  # the keys, in id order (one array: take is faster)

    def encode(self, key: pa.Array) -> np.ndarray:
        if not len(key):
            return np.empty(0, np.int64)
        h = hash_strings(key)
        order = np.argsort(h)
        sorted_h = h[order]
        first = order[np.r_[True, sorted_h[1:] != sorted_h[:-1]]]  # a row of each distinct hash
        uniq = h[first]  # sorted: searchsorted then walks the table in order (cache friendly)
        pos = np.searchsorted(self.hashes, uniq)
        known = (pos < len(self.hashes)) & (self.hashes[np.minimum(pos, len(self.hashes) - 1)] == uniq) \
            if len(self.hashes) else np.zeros(len(uniq), bool)
        new = np.flatnonzero(~known)
        new_ids = np.arange(len(self.ids), len(self.ids) + len(new))
        if len(new):
            self.keys = pa.concat_arrays([self.keys, key.take(pa.array(first[new]))])
            self.hashes = np.insert(self.hashes, pos[new], uniq[new])
            self.ids = np.insert(self.ids, pos[new], new_ids)
        ids = np.empty(len(h), np.int64)
        ids[order] = self.ids[np.searchsorted(self.hashes, sorted_h)]
        if not pc.all(pc.equal(key, self.keys.take(pa.array(ids)))).as_py():
            raise ValueError("two image keys share a 64-bit hash; cannot aggregate safely")
        return ids

    def sorted_keys(self) -> tuple[pa.Array, np.ndarray]:
        """The keys in sorted order, and each id's position in that order."""
        keys = self.keys
        order = pc.sort_indices(keys).to_numpy().astype(np.int64)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return keys.take(pa.array(order)), rank


def sum_sorted(packed: np.ndarray, values: np.ndarray, *, merge: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``packed`` (sorted) and the sum of ``values`` over each."""
    if len(packed) and (packed[1:] > packed[:-1]).all():  # already an aggregate
        return packed, values
    # quicksort for a block in log order; a merge is sorted runs, where timsort shines
    order = np.argsort(packed, kind="stable" if merge else None)
    packed, values = packed[order], values[order]
    del order
    start = np.flatnonzero(np.r_[True, packed[1:] != packed[:-1]]) if len(packed) else np.empty(0, np.int64)
    return packed[start], (np.add.reduceat(values, start) if len(values) else values)


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """Distinct values of a fresh array (sorted in place, saving a copy).

    np.unique hashes 64-bit values first in numpy 2: several times slower."""
    a.sort()
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


class Aggregate:
    """Clicks per (key id, query class), packed as ``id << 16 | class + 2``, and
    the distinct (key id, query id) pairs, packed as ``id << 32 | query id``,
    that count duplicate lines.

    Blocks are summed on arrival; pending partial sums are merged as soon as
    they reach half the merged part, so memory stays within a small factor of
    the final aggregate (plus 8 bytes per distinct pair), whatever the log's
    length."""

    def __init__(self) -> None:
        self.packed: list[np.ndarray] = [np.empty(0, np.int64)]
        self.clicks: list[np.ndarray] = [np.empty(0, np.int64)]
        self.pairs: list[np.ndarray] = [np.empty(0, np.int64)]

    def add(self, kid: np.ndarray, qid: np.ndarray, code: np.ndarray, clicks: np.ndarray) -> None:
        packed, summed = sum_sorted((kid << 16) | (code.astype(np.int64) + 2), clicks)
        self.packed.append(packed)
        self.clicks.append(summed)
        self.pairs.append(sorted_unique((kid << 32) | qid))
        if sum(map(len, self.packed[1:])) > max(len(self.packed[0]) // 2, 1 << 20):
            self._merge_clicks()
        if sum(map(len, self.pairs[1:])) > max(len(self.pairs[0]) // 2, 1 << 20):
            self._merge_pairs()

    def _merge_clicks(self) -> None:
        packed, clicks = np.concatenate(self.packed), np.concatenate(self.clicks)
        self.packed, self.clicks = [], []  # free the pieces before sorting
        packed, clicks = sum_sorted(packed, clicks, merge=True)
        self.packed, self.clicks = [packed], [clicks]

    def _merge_pairs(self) -> None:
        pairs = np.concatenate(self.pairs)
        self.pairs = []
        self.pairs = [sorted_unique(pairs)]

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Key id, class code and clicks per (key, class); the distinct (key, query) count."""
        self._merge_clicks()
        self._merge_pairs()
        packed, clicks = self.packed[0], self.clicks[0]
        return packed >> 16, (packed & 0xFFFF) - 2, clicks, len(self.pairs[0])
