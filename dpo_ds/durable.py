"""Writes that survive a power loss in the order they were made. A folder is published by a mark written last
(checkpoint's manifest, universal_resume's layout mark) and a rename: its files and directories go to disk
(`fsync_tree`) before the mark does (`write_text_atomic`), so a folder that looks complete is complete."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` durable (files created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Make every file under `root` durable, then every directory under it and `root` itself."""
    paths = sorted(root.rglob("*"))
    for path in paths:
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    for path in [*paths, root]:
        if path.is_dir():
            fsync_dir(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` plus a newline: never half-written, and durable once this returns."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
