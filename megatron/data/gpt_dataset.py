"""Megatron's GPTDataset: fixed-length samples cut from a shuffled stream of documents.

Index semantics follow Megatron(-DeepSpeed)'s ``gpt_dataset.py`` and its C++
``build_sample_idx`` (here a compiled loop, `megatron.data.helpers`, with a numpy fallback):

* ``doc_idx``: the split's document ids repeated for ``num_epochs`` epochs and shuffled with
  ``np.random.RandomState(seed)``; when the last epoch would supply fewer than 80% of an
  epoch's samples it is shuffled separately (so the extra epoch does not mix into the others).
* ``sample_idx[j] = (position in doc_idx, offset in that document)`` of token ``j*seq_length``
  of the concatenated stream; sample j spans ``seq_length + 1`` tokens, so consecutive samples
  overlap by one token (the last label of one is the first input of the next).
* ``shuffle_idx``: a permutation of the samples (first epochs and last epoch separately when
  the last epoch is separate).

Index arrays are cached under ``cache_dir`` (`megatron.data.index_cache`: one file per index,
memory-mapped on load), keyed by the md5 of a description
that includes a hash of the document ids and their sizes (so an edited dataset never reuses a
stale index). Writes are atomic and loads are memory-mapped, so several ranks may build the
same index concurrently.
"""
from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import torch

from megatron.data.helpers import sample_idx_compiled
from megatron.data.index_cache import cached_index_arrays
from megatron.data.indexed_dataset import IndexedDataset

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")


def get_split_bounds(split_str: str, n_docs: int) -> list[int]:
    """Document boundaries [0, b1, b2, n_docs] of a ``--split`` such as "990,10,0" or "969, 30, 1".

    Same arithmetic as Megatron's ``get_train_valid_test_split_``: weights normalized, each
    split rounded separately, every boundary shifted so the last one equals ``n_docs``.
    """
    sep = "," if "," in split_str else "/" if "/" in split_str else None
    try:
        splits = [float(s) for s in (split_str.split(sep) if sep else [split_str])]
    except ValueError:
        raise ValueError(f"invalid --split {split_str!r}: expected up to 3 numbers like '990,10,0' "
                         "(train,valid,test weights)") from None
    if len(splits) > 3:
        raise ValueError(f"invalid --split {split_str!r}: at most 3 numbers (train,valid,test), got {len(splits)}")
    splits = (splits + [0.0, 0.0])[:3]
    if any(not math.isfinite(s) or s < 0 for s in splits) or sum(splits) <= 0:
        raise ValueError(f"invalid --split {split_str!r}: weights must be >= 0 with a positive sum")
    total = sum(splits)
    bounds = [0]
    for s in splits:
        bounds.append(bounds[-1] + int(round(s / total * float(n_docs))))
    diff = bounds[-1] - n_docs
    bounds = [bounds[0]] + [min(max(b - diff, 0), n_docs) for b in bounds[1:]]
    return bounds


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest E >= 1 with (E*tokens_per_epoch - 1) // seq_length >= num_samples."""
    if tokens_per_epoch <= 0:
        raise ValueError("cannot build samples from documents with no tokens")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                  separate_last_epoch: bool) -> np.ndarray:
    """The documents repeated ``num_epochs`` times, shuffled (last epoch apart if separate)."""
    if not separate_last_epoch or num_epochs == 1:
        doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, num_epochs - 1, rng, False)
    last = build_doc_idx(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs: int,
                     tokens_per_epoch: int, use_compiled: bool = True) -> np.ndarray:
    """(num_samples+1, 2) array of (position in doc_idx, offset) where sample j starts.

    Equivalent to Megatron's C++ ``build_sample_idx``: the start of sample j is global token
    ``j*seq_length`` of the concatenation of ``doc_idx``'s documents. int32 when it fits.
    """
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sizes = np.asarray(sizes)
    fits32 = len(doc_idx) < 2**31 and (len(sizes) == 0 or int(sizes.max()) < 2**31)  # offsets < a size
    dtype = np.int32 if fits32 else np.int64
    if use_compiled and fits32 and len(doc_idx) > 0:
        out = sample_idx_compiled(sizes, doc_idx, seq_length, num_samples, dtype)
        if out is not None:
            return out
    doc_sizes = sizes[doc_idx].astype(np.int64)
    ends = np.cumsum(doc_sizes)
    starts = ends - doc_sizes
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    doc_pos = np.searchsorted(ends, positions, side="right")
    offsets = positions - starts[doc_pos]
    sample_idx = np.stack([doc_pos, offsets], axis=1).astype(dtype)
    sample_idx[0] = 0  # as the C++ loop: sample 0 starts at (0, 0) even if that document is empty
    return sample_idx


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of [0, total_size): [0, num_samples) and the rest shuffled independently."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``seq_length + 1`` tokens over ``documents`` of one indexed dataset."""

    def __init__(self, name: str, indexed_dataset: IndexedDataset, documents: np.ndarray,
                 num_samples: int, seq_length: int, seed: int, cache_dir: str | None,
                 stats: dict | None = None) -> None:
        documents = np.asarray(documents, dtype=np.int64)
        if len(documents) == 0:
            raise ValueError(f"{name} dataset of {indexed_dataset.path_prefix}: no documents")
        if documents.min() < 0 or documents.max() >= len(indexed_dataset):
            raise ValueError(f"{name} dataset of {indexed_dataset.path_prefix}: document ids out of range")
        if seq_length <= 0 or num_samples < 0:
            raise ValueError(f"seq_length must be > 0 and num_samples >= 0 (got {seq_length}, {num_samples})")
        self.name, self.indexed_dataset = name, indexed_dataset
        self.num_samples, self.seq_length, self.seed = int(num_samples), int(seq_length), int(seed)
        doc_sizes = np.asarray(indexed_dataset.sizes)[documents]
        self.tokens_per_epoch = int(doc_sizes.sum(dtype=np.int64))
        if self.tokens_per_epoch == 0:
            raise ValueError(f"{name} dataset of {indexed_dataset.path_prefix}: documents have no tokens")
        self.num_epochs = num_epochs_needed(self.tokens_per_epoch, self.seq_length, self.num_samples)
        if self.num_epochs * len(documents) >= 2**31:
            raise ValueError(f"{name} dataset of {indexed_dataset.path_prefix}: {self.num_samples} samples "
                             f"need {self.num_epochs} epochs of {len(documents)} documents; too many")
        content = hashlib.md5(documents.tobytes() + doc_sizes.astype("<i8").tobytes()).hexdigest()
        description = (f"GPTDataset\nprefix {indexed_dataset.path_prefix}\nname {name}\n"
                       f"documents {len(documents)} [{documents[0]}..{documents[-1]}] md5 {content}\n"
                       f"tokens {self.tokens_per_epoch}\nnum_samples {self.num_samples}\n"
                       f"num_epochs {self.num_epochs}\nseq_length {self.seq_length}\nseed {self.seed}\n")
        arrays = cached_index_arrays(cache_dir, description, ("doc_idx", "sample_idx", "shuffle_idx"),
                                     lambda: self._build(documents), stats)
        self.doc_idx, self.sample_idx, self.shuffle_idx = (
            arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"])

    def _build(self, documents: np.ndarray) -> dict[str, np.ndarray]:
        seq, tokens, epochs = self.seq_length, self.tokens_per_epoch, self.num_epochs
        separate_last_epoch, from_first_epochs = False, 0
        if epochs > 1:
            from_first_epochs = ((epochs - 1) * tokens - 1) // seq
            last_epoch_samples = self.num_samples - from_first_epochs
            per_epoch = (tokens - 1) // seq
            separate_last_epoch = last_epoch_samples < int(0.80 * per_epoch)
        rng = np.random.RandomState(seed=self.seed)
        doc_idx = build_doc_idx(documents, epochs, rng, separate_last_epoch)
        sample_idx = build_sample_idx(self.indexed_dataset.sizes, doc_idx, seq, epochs, tokens)
        total = sample_idx.shape[0] - 1
        shuffle_idx = build_shuffle_idx(from_first_epochs if separate_last_epoch else total, total, rng)
        log.debug("built %s index for %s: %d samples, %d epochs, separate last epoch %s",
                  self.name, self.indexed_dataset.path_prefix, total, epochs, separate_last_epoch)
        return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {n} samples")
        j = int(self.shuffle_idx[idx])
        (doc_f, off_f), (doc_l, off_l) = self.sample_idx[j], self.sample_idx[j + 1]
        get = self.indexed_dataset.get
        if doc_f == doc_l:
            parts = [get(self.doc_idx[doc_f], offset=int(off_f), length=int(off_l - off_f + 1))]
        else:
            parts = [get(self.doc_idx[doc_f], offset=int(off_f))]
            parts += [get(self.doc_idx[k]) for k in range(int(doc_f) + 1, int(doc_l))]
            parts.append(get(self.doc_idx[doc_l], length=int(off_l) + 1))
        return {"text": np.concatenate(parts).astype(np.int64)}


def reset_position_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Position ids that restart at 0 after every end-of-document token (``--reset-position-ids``).

    Same as upstream's ``get_ltor_masks_and_position_ids``: the EOD token keeps its document's
    numbering and the token after it is position 0. ``tokens``: [b, s]; returns int64 [b, s].
    """
    b, s = tokens.shape
    arange = torch.arange(s, device=tokens.device).expand(b, s)
    starts = torch.zeros_like(tokens, dtype=torch.long)
    starts[:, 1:] = torch.where(tokens[:, :-1] == eod, arange[:, 1:], 0)
    return arange - torch.cummax(starts, dim=1).values


def document_attention_mask(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Boolean [b, 1, s, s] mask (True = may attend) for ``--reset-attention-mask``: causal, and
    no attention across an end-of-document token. As upstream's ``get_ltor_masks_and_position_ids``,
    the EOD token belongs to the document it ends; the token after it starts a new one."""
    b, s = tokens.shape
    doc = torch.zeros_like(tokens, dtype=torch.long)  # document number of each position
    doc[:, 1:] = torch.cumsum((tokens[:, :-1] == eod).long(), dim=1)
    causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
    return (doc[:, :, None] == doc[:, None, :]).logical_and_(causal).unsqueeze(1)

