"""Shared fixtures; every test process runs DeepSpeed on the CPU and talks only to 127.0.0.1."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["MASTER_ADDR"] = "127.0.0.1"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    from dpo_ds.demo_data import build_demo_assets

    return build_demo_assets(str(tmp_path_factory.mktemp("demo_assets")), n_train=96, n_heldout=16)

