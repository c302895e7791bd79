"""MB/s of the checkpoint checksum (xxh3-128, dpo_ds.checkpoint.file_digest) against the alternatives in the
venv, on one file of --size_mb random bytes, read in the same 8 MiB blocks, from the page cache (the state a
file is in right after a rank wrote it, when the checkpoint hashes it).

    python benchmarks/checksum_speed.py [--size_mb 1024] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib

import xxhash

BLOCK = 8 << 20
HASHES = {
    "xxh3_128": xxhash.xxh3_128,
    "xxh64": xxhash.xxh64,
    "crc32 (zlib)": None,
    "blake2b": hashlib.blake2b,
    "sha256": hashlib.sha256,
    "md5": hashlib.md5,
}


def digest_seconds(path: str, name: str) -> float:
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        if HASHES[name] is None:
            crc = 0
            while block := fh.read(BLOCK):
                crc = zlib.crc32(block, crc)
        else:
            h = HASHES[name]()
            while block := fh.read(BLOCK):
                h.update(block)
            h.hexdigest()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_mb", type=int, default=1024)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    fd, path = tempfile.mkstemp(dir=args.dir, suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as fh:
            for _ in range(args.size_mb // 8):
                fh.write(os.urandom(BLOCK))
        for name in HASHES:
            digest_seconds(path, name)  # warm the page cache and the code
            best = min(digest_seconds(path, name) for _ in range(3))
            print(f"{name:14s} {args.size_mb / best:8.0f} MB/s  ({best:.3f} s for {args.size_mb} MB, best of 3)")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
