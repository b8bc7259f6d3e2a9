"""Corpus blending of the ALCF fork (the in-tree "blendcorpus" logic) and the dataset entry point.

For each split (train/valid/test):

1. every list line is a file with weight w (normalized over the list) and a budget of
   ``ceil(N * w * 1.005)`` samples (0.5% slack so the blend never runs dry), drawn from a
   `GPTDataset` over that file's documents of the split;
2. files are grouped by corpus (3rd column), corpora sorted by name; a corpus is its files'
   samples concatenated in list order, permuted with ``RandomState(seed)`` when
   ``shuffle_sample_in_corpus`` (ALCF passes ``--shuffle-sample-in-corpus``);
3. corpora are interleaved by Megatron's deterministic greedy blend: output sample i comes
   from the corpus d maximizing ``w_d * max(i, 1) - taken_d`` (ties: lowest d), where
   ``w_d`` = corpus samples / total samples. Items are ``{"text": ..., "dataset_idx": d}``.

Differences from upstream, on purpose: files with no document (or no token) in a split are
skipped with a warning and the remaining weights renormalized (upstream crashes); the
corpus-level and blend-level cache keys cover every file prefix, budget and seed (upstream's
corpus key is only (name, count), a stale-cache hazard).
"""
from __future__ import annotations

import hashlib
import logging
import math
from array import array

import numpy as np
import torch

from megatron.data.data_list import DataSource
from megatron.data.gpt_dataset import SPLIT_NAMES, GPTDataset, cached_index_arrays, get_split_bounds
from megatron.data.indexed_dataset import IndexedDataset

log = logging.getLogger(__name__)


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index, sample index within that dataset) for each of ``size`` output samples.

    Megatron's greedy max-error blend, exactly (same float arithmetic as its C++ helper).
    The choice is inherently sequential; the loop runs on Python floats (~0.3-1 s per
    million samples for a handful of datasets) and the result is cached by the callers.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {weights!r}")
    w = (w / w.sum()).tolist()
    n = len(w)
    index_dtype = np.uint8 if n <= 256 else np.int32
    if n == 1:
        return np.zeros(size, dtype=index_dtype), np.arange(size, dtype=np.int64)
    taken = [0] * n
    picks = array("i")
    append = picks.append
    others = range(1, n)
    w0 = w[0]
    for i in range(size):
        x = i if i > 0 else 1
        best, best_err = 0, w0 * x - taken[0]
        for d in others:
            err = w[d] * x - taken[d]
            if err > best_err:
                best, best_err = d, err
        taken[best] += 1
        append(best)
    dataset_index = np.frombuffer(picks, dtype=np.int32).astype(index_dtype)
    sample_index = np.empty(size, dtype=np.int64)
    for d in range(n):
        where = dataset_index == d
        sample_index[where] = np.arange(taken[d], dtype=np.int64)
    return dataset_index, sample_index


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


class CorpusDataset(torch.utils.data.Dataset):
    """The first ``num_samples[f]`` samples of each file dataset f, concatenated (optionally permuted)."""

    def __init__(self, name: str, datasets: list, num_samples: list[int], shuffle: bool, seed: int,
                 cache_dir: str | None = None, description: str = "") -> None:
        if len(datasets) != len(num_samples) or not datasets:
            raise ValueError("CorpusDataset needs one sample count per dataset")
        for ds, k in zip(datasets, num_samples):
            if len(ds) < k:
                raise ValueError(f"corpus {name}: a file dataset has {len(ds)} samples, {k} requested")
        self.name, self.datasets = name, datasets
        self.offsets = np.concatenate([[0], np.cumsum(num_samples, dtype=np.int64)])
        size = int(self.offsets[-1])
        self.perm = None
        if shuffle:
            desc = f"CorpusDataset\nname {name}\nseed {seed}\nsize {size}\n{description}"
            self.perm = cached_index_arrays(
                cache_dir, desc, ("corpus_perm",),
                lambda: {"corpus_perm": np.random.RandomState(seed).permutation(size)})["corpus_perm"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, k: int) -> tuple[int, int]:
        """(file index, sample index in that file) of corpus sample k."""
        j = int(self.perm[k]) if self.perm is not None else int(k)
        f = int(np.searchsorted(self.offsets, j, side="right")) - 1
        return f, j - int(self.offsets[f])

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < len(self):
            raise IndexError(f"sample {k} out of range for corpus {self.name} of {len(self)} samples")
        f, s = self.locate(k)
        return self.datasets[f][s]


class BlendableDataset(torch.utils.data.Dataset):
    """Deterministic greedy interleave of ``datasets`` in proportion to ``weights``."""

    def __init__(self, datasets: list, weights, size: int, cache_dir: str | None = None,
                 corpus_names: list[str] | None = None, description: str = "") -> None:
        self.datasets, self.size = datasets, int(size)
        self.corpus_names = list(corpus_names) if corpus_names is not None else [str(i) for i in range(len(datasets))]
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        desc = (f"BlendableDataset\nsize {self.size}\nweights {self.weights.tolist()}\n"
                f"corpora {self.corpus_names}\n{description}")

        def build() -> dict[str, np.ndarray]:
            if self.size > 10_000_000:
                log.info("building the blend index of %d samples (about %d s, cached afterwards)",
                         self.size, self.size // 2_000_000)
            di, si = build_blending_indices(self.weights, self.size)
            return {"dataset_index": di, "dataset_sample_index": si}

        arrays = cached_index_arrays(cache_dir, desc, ("dataset_index", "dataset_sample_index"), build)
        self.dataset_index, self.dataset_sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, ds in enumerate(datasets):
            if counts[d] > len(ds):
                raise RuntimeError(f"blend draws {counts[d]} samples from {self.corpus_names[d]}, "
                                   f"which has {len(ds)}")
        self.corpus_sizes = [len(ds) for ds in datasets]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for a blend of {self.size} samples")
        d = int(self.dataset_index[i])
        return {"dataset_idx": d, **self.datasets[d][int(self.dataset_sample_index[i])]}


def file_budgets(weights: list[float], num_samples: int) -> list[int]:
    """Per-file sample budgets ``ceil(N * w * 1.005)`` with the weights normalized."""
    total = float(sum(weights))
    return [int(math.ceil(num_samples * (w / total) * 1.005)) for w in weights]


def _build_split(k: int, num_samples: int, sources: list[DataSource], indexed: dict[str, IndexedDataset],
                 split: str, seq_length: int, seed: int, cache_dir: str | None,
                 shuffle: bool) -> BlendableDataset | None:
    name = SPLIT_NAMES[k]
    usable = []
    for src in sources:
        if src.weight <= 0:
            continue
        ds = indexed[src.prefix]
        bounds = get_split_bounds(split, len(ds))
        docs = np.arange(bounds[k], bounds[k + 1], dtype=np.int64)
        if len(docs) == 0 or int(ds.sizes[docs].sum(dtype=np.int64)) == 0:
            log.warning("%s: no %s documents with split %s (%d documents); skipped for %s",
                        src.prefix, name, split, len(ds), name)
            continue
        usable.append((src, docs))
    if not usable:
        log.warning("no %s data: no file has %s documents with split %s", name, name, split)
        return None
    budgets = file_budgets([src.weight for src, _ in usable], num_samples)
    by_corpus: dict[str, list] = {}
    for (src, docs), budget in zip(usable, budgets):
        gpt = GPTDataset(name, indexed[src.prefix], docs, budget, seq_length, seed, cache_dir)
        by_corpus.setdefault(src.corpus, []).append((src.prefix, gpt, budget))
    names = sorted(by_corpus)
    corpora, lines = [], []
    for cname in names:
        files = by_corpus[cname]
        desc = f"split {name} {split}\nseq_length {seq_length}\n" + "".join(
            f"{prefix} {budget}\n" for prefix, _, budget in files)
        corpora.append(CorpusDataset(cname, [g for _, g, _ in files], [b for _, _, b in files],
                                     shuffle, seed, cache_dir, desc))
        lines.append(f"corpus {cname} shuffle {shuffle} files {_md5(desc)}\n")
    sizes = np.array([len(c) for c in corpora], dtype=np.float64)
    blend = BlendableDataset(corpora, sizes, int(sizes.sum()), cache_dir, names,
                             description=f"seed {seed}\n" + "".join(lines))
    log.info("%s: %d samples from %d files in %d corpora", name, len(blend), len(usable), len(names))
    return blend


def build_train_valid_test_datasets(
        sources: list[DataSource], split: str, train_valid_test_num_samples: tuple[int, int, int],
        seq_length: int, seed: int, cache_dir: str | None, shuffle_sample_in_corpus: bool = True,
) -> tuple[BlendableDataset | None, BlendableDataset | None, BlendableDataset | None]:
    """Blended train/valid/test datasets (None for a split with 0 samples requested or no documents).

    Each blended dataset carries ``corpus_names`` (its ``dataset_idx`` values index this list).
    """
    if not sources:
        raise ValueError("no data sources")
    if len(train_valid_test_num_samples) != 3:
        raise ValueError("train_valid_test_num_samples must have 3 entries")
    get_split_bounds(split, 1)  # validate the split string before opening anything
    indexed: dict[str, IndexedDataset] = {}
    for src in sources:
        if src.prefix not in indexed:
            indexed[src.prefix] = IndexedDataset(src.prefix)
    return tuple(
        _build_split(k, int(n), sources, indexed, split, seq_length, seed, cache_dir, shuffle_sample_in_corpus)
        if int(n) > 0 else None
        for k, n in enumerate(train_valid_test_num_samples))
