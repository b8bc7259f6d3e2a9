"""What a complete checkpoint looked like: `global_step<N>/manifest.json`, and its verification.

Every save writes, inside the checkpoint directory and before the directory is committed (renamed
from `global_step<N>.partial`, megatron/checkpoint/checkpointing.py), a manifest listing every file of the
checkpoint with its size and a fast checksum:

    {"format": 1, "algorithm": "xxh3_64", "tag": "global_step20", "iteration": 20,
     "files": {"mp_rank_00_model_states.pt": {"size": 123, "digest": "9f0c...", "rank": 0}, ...}}

Multi-rank saves: every rank hashes the files it writes while it writes them (the checkpoint
engine's file object feeds each written block to the hash, so nothing is read back); the entries
are gathered to rank 0, which hashes what no rank claimed (`megatron_args.json`, DeepSpeed's
`zero_to_fp32.py`) and writes the one manifest. The manifest is in the directory when it is renamed,
so a committed checkpoint always has it.

Verification: sizes (and that every listed file is there and nothing else is) cost one `stat` per
file and are checked at every load; checksums cost a full read of every file and are checked with
`--verify-checkpoint` and by `tools/verify_checkpoint.py` (see ALCF/notes/checkpoints.md for the
measured cost). A checkpoint without a manifest (written before manifests existed, or converted to
universal) is loaded unverified.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterable

MANIFEST = "manifest.json"
LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
TAG_RE = re.compile(r"^global_step(\d+)$")
FORMAT = 1
CHUNK = 1 << 22  # 4 MiB reads when a file is hashed after the fact


# (the tag helpers live here, free of torch, so tools/verify_checkpoint.py starts in a blink)
def read_tag(load_dir: str, universal: bool = False) -> str | None:
    """The tag named by `latest` (or `latest_universal`), None if the file is missing or empty."""
    path = os.path.join(load_dir, LATEST_UNIVERSAL if universal else LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def checkpoint_tags(save_dir: str) -> list[tuple[int, str]]:
    """Complete `global_step<N>` directories (not partial, not universal), oldest first."""
    if not os.path.isdir(save_dir):
        return []
    tags = []
    for name in os.listdir(save_dir):
        m = TAG_RE.match(name)
        if m and os.path.isdir(os.path.join(save_dir, name)):
            tags.append((int(m.group(1)), name))
    return sorted(tags)


class _Crc32:
    """zlib.crc32 with the hashlib interface (the fallback when xxhash is not installed)."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def _xxh3():
    import xxhash  # noqa: PLC0415

    return xxhash.xxh3_64()


ALGORITHMS = {"xxh3_64": _xxh3, "crc32": _Crc32}


def default_algorithm() -> str:
    try:
        import xxhash  # noqa: F401, PLC0415
    except ImportError:
        return "crc32"
    return "xxh3_64"


def new_hasher(algorithm: str):
    return ALGORITHMS[algorithm]()


def hash_file(path: str, algorithm: str) -> str:
    h = new_hasher(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def entry(path: str, algorithm: str, digest: str | None = None, rank: int = 0) -> dict:
    """One manifest entry; the digest is computed from the file unless given."""
    return {"size": os.path.getsize(path), "digest": digest or hash_file(path, algorithm), "rank": rank}


def list_files(tag_dir: str) -> list[str]:
    """Every file under `tag_dir` (relative, '/'-separated), the manifest itself excluded."""
    out = []
    for root, _dirs, files in os.walk(tag_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), tag_dir).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(tag_dir: str, entries: dict, algorithm: str, tag: str, iteration: int, rank: int = 0) -> dict:
    """Complete `entries` ({relative name: entry}) with every unclaimed file of `tag_dir` (hashed here)
    and write the manifest. Returns it."""
    files = dict(entries)
    for rel in list_files(tag_dir):
        if rel not in files:
            files[rel] = entry(os.path.join(tag_dir, rel), algorithm, rank=rank)
    missing = sorted(set(files) - set(list_files(tag_dir)))
    if missing:
        raise OSError(f"{os.path.join(tag_dir, missing[0])}: written by rank {files[missing[0]]['rank']} but not "
                      "in the checkpoint directory (is --save on a file system every rank shares?)")
    manifest = {"format": FORMAT, "algorithm": algorithm, "tag": tag, "iteration": iteration,
                "files": dict(sorted(files.items()))}
    path = os.path.join(tag_dir, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


class ManifestError(ValueError):
    """The manifest itself cannot be read."""


def read_manifest(tag_dir: str) -> dict | None:
    """The manifest of a checkpoint directory, None if it has none (an older checkpoint)."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
        for e in files.values():
            int(e["size"]), str(e["digest"])  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{MANIFEST} is unreadable ({type(e).__name__}: {str(e)[:100]})") from None
    if manifest.get("algorithm") not in ALGORITHMS:
        raise ManifestError(f"{MANIFEST} uses the checksum {manifest.get('algorithm')!r}, unknown here")
    return manifest


def problems(tag_dir: str, checksums: bool = False, only: Iterable[str] | None = None) -> list[str]:
    """What is wrong with the checkpoint in `tag_dir` against its manifest ([] if it is intact or
    has no manifest). Sizes, missing and foreign files always; checksums if asked (of the files in
    `only` when given: a rank verifies its share)."""
    try:
        manifest = read_manifest(tag_dir)
    except ManifestError as e:
        return [str(e)]
    if manifest is None:
        return []
    files, errs = manifest["files"], []
    present = set(list_files(tag_dir))
    for rel in sorted(present - set(files)):
        errs.append(f"{rel} is not part of this checkpoint (not in its manifest: a foreign or left-over file; "
                    "remove it)")
    for rel, e in files.items():
        path = os.path.join(tag_dir, rel)
        if rel not in present:
            errs.append(f"{rel} is missing")
            continue
        size = os.path.getsize(path)
        if size != e["size"]:
            how = "truncated" if size < e["size"] else "grown"
            errs.append(f"{rel} has {size} bytes, the manifest says {e['size']} ({how})")
        elif checksums and (only is None or rel in only):
            got = hash_file(path, manifest["algorithm"])
            if got != e["digest"]:
                errs.append(f"{rel} has checksum {got}, the manifest says {e['digest']} (damaged or replaced)")
    return errs


def has_manifest(tag_dir: str) -> bool:
    return os.path.exists(os.path.join(tag_dir, MANIFEST))
