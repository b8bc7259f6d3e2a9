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

With ``blend_sample_in_corpus`` a corpus interleaves its files by the same greedy blend
(weights = file budgets) instead of concatenating them.

Scale: with ``world_size > 1`` and a cache directory, file index building is spread over the
ranks (file job j is built by rank ``j % world_size`` and written to the cache), then every
rank waits at ``barrier()``; rank 0 builds the corpus/blend indices, a second barrier, and
the other ranks load everything from the cache (memory-mapped). Without a shared cache each
rank still builds what it misses (correct, only slower).

Differences from upstream, on purpose: files with no document (or no token) in a split are
skipped with a warning and the remaining weights renormalized (upstream crashes); the
corpus-level and blend-level cache keys cover every file prefix, budget and seed (upstream's
corpus key is only (name, count), a stale-cache hazard).
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from megatron.data.data_list import DataSource
from megatron.data.gpt_dataset import SPLIT_NAMES, GPTDataset, cached_index_arrays, get_split_bounds
from megatron.data.helpers import blend_indices
from megatron.data.indexed_dataset import IndexedDataset

log = logging.getLogger(__name__)


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dataset index, sample index within that dataset, samples drawn per dataset) for each of
    ``size`` output samples.

    Megatron's greedy max-error blend, bit-identical to its C++ helper (see
    `megatron.data.helpers`, compiled on first use; exact Python fallback without a compiler).
    The dataset index is uint8 for up to 256 datasets (else int32), the sample index int32 below
    2^31 samples (else int64).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {weights!r}")
    w = w / w.sum()
    if len(w) == 1:
        return (np.zeros(size, dtype=np.uint8), np.arange(size, dtype=np.int32 if size < 2**31 else np.int64),
                np.array([size], dtype=np.int64))
    return blend_indices(w, int(size))


def _check_draws(counts: np.ndarray, datasets: list, what) -> None:
    """The blend must not draw more samples from a dataset than it has (counts: per dataset)."""
    for d, ds in enumerate(datasets):
        if counts[d] > len(ds):
            raise RuntimeError(f"the blend draws {counts[d]} samples from {what(d)}, which has {len(ds)}")


def permutation(size: int, seed: int) -> np.ndarray:
    """``np.random.RandomState(seed).permutation(size)`` (same values), int32 when it fits: half
    the memory and cache bytes of the int64 result for the same random draws."""
    perm = np.arange(size, dtype=np.int32 if size < 2**31 else np.int64)
    np.random.RandomState(seed).shuffle(perm)
    return perm


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


class CorpusDataset(torch.utils.data.Dataset):
    """The first ``num_samples[f]`` samples of each file dataset f, concatenated in file order
    (or greedily interleaved in proportion to ``num_samples`` when ``blend``), optionally permuted."""

    def __init__(self, name: str, datasets: list, num_samples: list[int], shuffle: bool, seed: int,
                 cache_dir: str | None = None, description: str = "", blend: bool = False,
                 stats: dict | None = None) -> None:
        if len(datasets) != len(num_samples) or not datasets:
            raise ValueError("CorpusDataset needs one sample count per dataset")
        for ds, k in zip(datasets, num_samples):
            if len(ds) < k:
                raise ValueError(f"corpus {name}: a file dataset has {len(ds)} samples, {k} requested")
        self.name, self.datasets = name, datasets
        self.offsets = np.concatenate([[0], np.cumsum(num_samples, dtype=np.int64)])
        size = int(self.offsets[-1])
        self.file_index = self.file_sample_index = None
        if blend and len(datasets) > 1:
            desc = f"CorpusBlend\nname {name}\nsize {size}\n{description}"

            def build() -> dict[str, np.ndarray]:
                di, si, counts = build_blending_indices(np.asarray(num_samples, dtype=np.float64), size)
                return {"file_index": di, "file_sample_index": si, "file_counts": counts}

            arrays = cached_index_arrays(cache_dir, desc, ("file_index", "file_sample_index", "file_counts"),
                                         build, stats)
            self.file_index, self.file_sample_index = arrays["file_index"], arrays["file_sample_index"]
            _check_draws(arrays["file_counts"], datasets, lambda f: f"corpus {name}: file {f}")
        self.perm = None
        if shuffle:
            desc = f"CorpusDataset\nname {name}\nseed {seed}\nsize {size}\nblend {blend}\n{description}"
            self.perm = cached_index_arrays(
                cache_dir, desc, ("corpus_perm",),
                lambda: {"corpus_perm": permutation(size, seed)}, stats)["corpus_perm"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, k: int) -> tuple[int, int]:
        """(file index, sample index in that file) of corpus sample k."""
        j = int(self.perm[k]) if self.perm is not None else int(k)
        if self.file_index is not None:
            return int(self.file_index[j]), int(self.file_sample_index[j])
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
                 corpus_names: list[str] | None = None, description: str = "",
                 stats: dict | None = None) -> None:
        self.datasets, self.size = datasets, int(size)
        self.corpus_names = list(corpus_names) if corpus_names is not None else [str(i) for i in range(len(datasets))]
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        desc = (f"BlendableDataset\nsize {self.size}\nweights {self.weights.tolist()}\n"
                f"corpora {self.corpus_names}\n{description}")

        def build() -> dict[str, np.ndarray]:
            di, si, counts = build_blending_indices(self.weights, self.size)
            return {"dataset_index": di, "dataset_sample_index": si, "dataset_counts": counts}

        arrays = cached_index_arrays(cache_dir, desc, ("dataset_index", "dataset_sample_index", "dataset_counts"),
                                     build, stats)
        self.dataset_index, self.dataset_sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
        _check_draws(arrays["dataset_counts"], datasets, lambda d: f"corpus {self.corpus_names[d]}")
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


@dataclass
class _FileJob:
    split: int
    source: DataSource
    documents: np.ndarray
    budget: int


def _plan_split(k: int, num_samples: int, sources: list[DataSource], indexed: dict[str, IndexedDataset],
                split: str) -> list[_FileJob]:
    """The file datasets of split k: usable files (documents with tokens) and their budgets."""
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
        return []
    budgets = file_budgets([src.weight for src, _ in usable], num_samples)
    return [_FileJob(k, src, docs, b) for (src, docs), b in zip(usable, budgets)]


def _file_dataset(job: _FileJob, indexed: dict[str, IndexedDataset], seq_length: int, seed: int,
                  cache_dir: str | None, stats: dict | None) -> GPTDataset:
    return GPTDataset(SPLIT_NAMES[job.split], indexed[job.source.prefix], job.documents, job.budget,
                      seq_length, seed, cache_dir, stats=stats)


def _build_split(jobs: list[_FileJob], indexed: dict[str, IndexedDataset], split: str, seq_length: int,
                 seed: int, cache_dir: str | None, shuffle: bool, blend_in_corpus: bool,
                 stats: dict | None) -> BlendableDataset | None:
    if not jobs:
        return None
    name = SPLIT_NAMES[jobs[0].split]
    by_corpus: dict[str, list] = {}
    for job in jobs:
        gpt = _file_dataset(job, indexed, seq_length, seed, cache_dir, stats)
        by_corpus.setdefault(job.source.corpus, []).append((job.source.prefix, gpt, job.budget))
    names = sorted(by_corpus)
    corpora, lines = [], []
    for cname in names:
        files = by_corpus[cname]
        desc = f"split {name} {split}\nseq_length {seq_length}\n" + "".join(
            f"{prefix} {budget}\n" for prefix, _, budget in files)
        corpora.append(CorpusDataset(cname, [g for _, g, _ in files], [b for _, _, b in files],
                                     shuffle, seed, cache_dir, desc, blend=blend_in_corpus, stats=stats))
        lines.append(f"corpus {cname} shuffle {shuffle} blend {blend_in_corpus} files {_md5(desc)}\n")
    sizes = np.array([len(c) for c in corpora], dtype=np.float64)
    blend = BlendableDataset(corpora, sizes, int(sizes.sum()), cache_dir, names,
                             description=f"seed {seed}\n" + "".join(lines), stats=stats)
    log.info("%s: %d samples from %d files in %d corpora", name, len(blend), len(jobs), len(names))
    return blend


def build_train_valid_test_datasets(
        sources: list[DataSource], split: str, train_valid_test_num_samples: tuple[int, int, int],
        seq_length: int, seed: int, cache_dir: str | None, shuffle_sample_in_corpus: bool = True,
        blend_sample_in_corpus: bool = False, rank: int = 0, world_size: int = 1,
        barrier: Callable[[], None] | None = None, stats: dict | None = None,
) -> tuple[BlendableDataset | None, BlendableDataset | None, BlendableDataset | None]:
    """Blended train/valid/test datasets (None for a split with 0 samples requested or no documents).

    Each blended dataset carries ``corpus_names`` (its ``dataset_idx`` values index this list).
    With ``world_size > 1``, a ``barrier`` (called the same number of times on every rank) and a
    ``cache_dir`` shared by the ranks, each file's index is built once, by rank ``j % world_size``
    for file job j, and the corpus/blend indices by rank 0; the others load them from the cache.
    ``stats`` (optional dict) counts index arrays ``built`` and ``loaded`` by this call.
    """
    if not sources:
        raise ValueError("no data sources")
    if len(train_valid_test_num_samples) != 3:
        raise ValueError("train_valid_test_num_samples must have 3 entries")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size = {world_size})")
    get_split_bounds(split, 1)  # validate the split string before opening anything
    indexed: dict[str, IndexedDataset] = {}
    for src in sources:
        if src.prefix not in indexed:
            indexed[src.prefix] = IndexedDataset(src.prefix)
    plans = [_plan_split(k, int(n), sources, indexed, split) if int(n) > 0 else []
             for k, n in enumerate(train_valid_test_num_samples)]
    shared = world_size > 1 and barrier is not None and cache_dir is not None
    if world_size > 1 and not shared:
        log.warning("data indices: no shared --data-cache-path (or no barrier); every rank builds them all")
    if shared:  # phase 1: file indices round robin over the ranks
        jobs = [job for plan in plans for job in plan]
        for j in range(rank, len(jobs), world_size):
            _file_dataset(jobs[j], indexed, seq_length, seed, cache_dir, stats)
        barrier()

    def build_all():
        return tuple(_build_split(plan, indexed, split, seq_length, seed, cache_dir, shuffle_sample_in_corpus,
                                  blend_sample_in_corpus, stats) for plan in plans)

    if not shared:
        return build_all()
    result = build_all() if rank == 0 else None  # phase 2: rank 0 builds corpus and blend indices
    barrier()
    return result if rank == 0 else build_all()  # the others load everything from the cache


def check_data_vocab(prefixes: list[str], vocab_size: int, rank: int = 0, world_size: int = 1,
                     sample_bytes: int | None = 1 << 16) -> int:
    """Raise ValueError if a data file holds a token id >= ``vocab_size`` (the model's vocabulary).

    Cheap enough for start-up: each rank checks its share of the files (``prefixes[rank::world_size]``)
    on ``sample_bytes`` read from evenly spaced windows of each `.bin` (``None``: every token);
    uint8/uint16 files are skipped when the vocabulary covers their whole range. Returns the
    largest id seen (-1 if nothing was read).
    """
    worst = -1
    for prefix in list(dict.fromkeys(prefixes))[rank::world_size]:
        ds = IndexedDataset(prefix)
        if ds.dtype.kind == "u" and np.iinfo(ds.dtype).max < vocab_size:
            continue
        m = ds.max_token_id(sample_bytes)
        if m >= vocab_size:
            raise ValueError(f"{prefix}.bin: token id {m} >= the model's vocabulary size {vocab_size}; "
                             "the data was tokenized with another tokenizer (check TOKENIZER_MODEL / --tokenizer-*)")
        worst = max(worst, m)
    return worst
