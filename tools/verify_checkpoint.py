#!/usr/bin/env python
"""Check checkpoints against their manifests (sizes, missing or foreign files, checksums).

    python tools/verify_checkpoint.py CKPT_DIR                 # the checkpoint `latest` names
    python tools/verify_checkpoint.py CKPT_DIR --tag global_step200
    python tools/verify_checkpoint.py CKPT_DIR --all           # every global_step<N>, newest intact named
    python tools/verify_checkpoint.py CKPT_DIR/global_step200  # one checkpoint directory
    ... --sizes-only                                           # skip the checksums (one stat per file)

Prints one line per checkpoint (``OK``, ``DAMAGED`` with one indented line per problem, or
``NO MANIFEST``: written before manifests existed, cannot be verified) and exits 0 when every
checkpoint checked is intact, 1 otherwise (2: bad arguments). The manifest format is described in
megatron/checkpoint/manifest.py.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpoint import manifest as checkpoint_manifest  # noqa: E402
from megatron.checkpoint.manifest import checkpoint_tags, read_tag  # noqa: E402


def verify(tag_dir: str, checksums: bool) -> bool:
    name = os.path.basename(os.path.normpath(tag_dir))
    if not checkpoint_manifest.has_manifest(tag_dir):
        print(f"{name}: NO MANIFEST (cannot be verified)")
        return False
    errs = checkpoint_manifest.problems(tag_dir, checksums=checksums)
    if not errs:
        manifest = checkpoint_manifest.read_manifest(tag_dir)
        n, size = len(manifest["files"]), sum(e["size"] for e in manifest["files"].values())
        what = f"{manifest['algorithm']} checksums" if checksums else "sizes only"
        print(f"{name}: OK ({n} files, {size / 2**20:.1f} MiB, {what})")
        return True
    print(f"{name}: DAMAGED")
    for e in errs:
        print(f"  {e}")
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a checkpoint directory (holding 'latest') or one global_step<N> directory")
    p.add_argument("--tag", help="the global_step<N> to check (default: the one 'latest' names)")
    p.add_argument("--all", action="store_true", help="check every global_step<N> and name the newest intact one")
    p.add_argument("--sizes-only", action="store_true", help="skip the checksums")
    args = p.parse_args(argv)
    checksums = not args.sizes_only
    if not os.path.isdir(args.path):
        print(f"ERROR: {args.path} is not a directory", file=sys.stderr)
        return 2
    if checkpoint_manifest.has_manifest(args.path) and not (args.tag or args.all):
        return 0 if verify(args.path, checksums) else 1
    if args.all:
        tags = [name for _, name in reversed(checkpoint_tags(args.path))]
        if not tags:
            print(f"ERROR: no global_step<N> directory in {args.path}", file=sys.stderr)
            return 2
        ok = {t: verify(os.path.join(args.path, t), checksums) for t in tags}
        intact = next((t for t in tags if ok[t]), None)
        print(f"newest intact: {intact}" if intact else "no intact checkpoint")
        return 0 if all(ok.values()) else 1
    tag = args.tag or read_tag(args.path)
    if tag is None:
        print(f"ERROR: {args.path} has no 'latest' file; give --tag global_step<N> or --all", file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.join(args.path, tag)):
        print(f"ERROR: {os.path.join(args.path, tag)} does not exist", file=sys.stderr)
        return 2
    return 0 if verify(os.path.join(args.path, tag), checksums) else 1


if __name__ == "__main__":
    sys.exit(main())
