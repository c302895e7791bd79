"""Checkpoint verification and fallback in one process (issue 24): checksums against the manifest, which
checkpoint `resume_from` picks when the newest is damaged, `latest` repaired, pruning that keeps the last
good checkpoint. Checkpoints here are directories of small files with a manifest written by the test."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import xxhash

import dpo_ds.checkpoint as ckpt
from dpo_ds.parallel import Parallel


def make_checkpoint(root: Path, step: int, sizes_only: bool = False) -> Path:
    """checkpoints/step-N with two rank files and a trainer state, and its manifest (xxh3-128 of each file)."""
    path = root / f"step-{step:08d}"
    files = {"ds/zero_pp_rank_0_mp_rank_00_optim_states.pt": bytes(range(256)) * 8,
             "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": bytes(range(255, -1, -1)) * 8,
             "trainer_state.json": json.dumps({"step": step, "sampler": {}, "world_size": 2, "pairs_per_step": 4,
                                               "data_fingerprint": "d", "model_fingerprint": "m",
                                               "config": {}}).encode()}
    manifest = {}
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
        manifest[rel] = len(data) if sizes_only else {"size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    (path / "manifest.json").write_text(json.dumps({"files": manifest}))
    return path


def run_with(tmp_path: Path, steps: list[int], latest: int | None) -> Path:
    root = tmp_path / "run" / "checkpoints"
    for step in steps:
        make_checkpoint(root, step)
    if latest is not None:
        (root / "latest").write_text(f"step-{latest:08d}\n")
    return root


def overwrite_256_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100:356] = bytes(256)
    path.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def fresh_verified(monkeypatch):
    monkeypatch.setattr(ckpt, "_verified", set())


def test_checksum_finds_same_size_alteration_truncation_and_loss(tmp_path):
    path = make_checkpoint(tmp_path, 2)
    rank1 = path / "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert ckpt.checkpoint_problems(path) == []
    overwrite_256_bytes(rank1)
    assert ckpt.checkpoint_problems(path) == [f"{rank1}: contents altered (same size, xxh3_128 digest differs "
                                              f"from the manifest's)"]
    assert ckpt.checkpoint_problems(path, checksums=False) == []  # convert --skip_checksums: sizes only
    assert ckpt.checkpoint_problems(path, rank=0, world_size=2) == []  # rank 1 checks its own file
    rank1.write_bytes(b"x")
    assert ckpt.checkpoint_problems(path) == [f"{rank1}: truncated or altered (1 bytes, expected 2048)"]
    rank1.unlink()
    assert ckpt.checkpoint_problems(path) == [f"{rank1}: missing from checkpoint {path}"]


def test_manifest_of_sizes_only_still_loads(tmp_path):
    path = make_checkpoint(tmp_path, 2, sizes_only=True)
    overwrite_256_bytes(path / "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert ckpt.checkpoint_problems(path) == []  # written before issue 24: nothing to compare the contents with


def test_owner_is_the_rank_in_the_file_name():
    assert ckpt._owner("ds/zero_pp_rank_3_mp_rank_00_optim_states.pt", 4) == 3
    assert ckpt._owner("ds/mp_rank_00_model_states.pt", 4) == 0
    assert ckpt._owner("rng/rank-00002.safetensors", 4) == 2
    assert ckpt._owner("rng/rank-00005.safetensors", 4) == 1  # resumed at a smaller world size
    assert ckpt._owner("hf/config.json", 4) == 0


def test_a_rank_hashes_only_its_own_files_while_others_still_write(tmp_path):
    """Seen in a QLoRA run: rank 0 listed rng/ while rank 1's RNG file was still a safetensors temporary
    (rng/.tmpXXXXXX, no rank in its name, so rank 0's), which was renamed before rank 0 opened it."""
    for rel in ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "rng/rank-00000.safetensors", "rng/.tmpKLO3cg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert ckpt._files_of_rank(tmp_path, 0, 2) == ["ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                   "rng/rank-00000.safetensors"]
    assert ckpt._files_of_rank(tmp_path, 1, 2) == ["ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                                   "rng/rank-00001.safetensors"]


def test_auto_falls_back_to_newest_good_and_repairs_latest(tmp_path, caplog):
    root = run_with(tmp_path, [2, 4, 6], latest=6)
    bad = root / "step-00000006" / "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    overwrite_256_bytes(bad)
    with caplog.at_level(logging.WARNING, logger="dpo_ds"):
        assert ckpt.find_checkpoint(str(root.parent), "auto", Parallel()) == root / "step-00000004"
    assert f"{bad}: contents altered" in caplog.text and f"resuming from {root / 'step-00000004'}" in caplog.text
    assert (root / "latest").read_text().strip() == "step-00000004"


def test_auto_when_latest_names_a_deleted_checkpoint(tmp_path, caplog):
    root = run_with(tmp_path, [2, 4], latest=6)
    with caplog.at_level(logging.WARNING, logger="dpo_ds"):
        assert ckpt.find_checkpoint(str(root.parent), "auto", Parallel()) == root / "step-00000004"
    assert "names step-00000006, which does not exist" in caplog.text
    assert (root / "latest").read_text().strip() == "step-00000004"


def test_auto_ignores_a_checkpoint_latest_never_named(tmp_path):
    root = run_with(tmp_path, [2, 4], latest=2)  # killed after renaming step-4, before `latest` named it
    assert ckpt.find_checkpoint(str(root.parent), "auto", Parallel()) == root / "step-00000002"


def test_auto_with_nothing_that_verifies_stops(tmp_path):
    root = run_with(tmp_path, [2], latest=2)
    (root / "step-00000002" / "trainer_state.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint to resume from verifies: .*trainer_state.json"):
        ckpt.find_checkpoint(str(root.parent), "auto", Parallel())


def test_explicit_path_that_fails_names_the_newest_good_one(tmp_path):
    root = run_with(tmp_path, [2, 4, 6], latest=6)
    for step in (4, 6):
        (root / f"step-{step:08d}" / "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError) as failed:
        ckpt.find_checkpoint(str(root.parent), str(root / "step-00000006"), Parallel())
    assert str(failed.value).endswith(f"The newest checkpoint beside it that verifies is {root / 'step-00000002'}")


def test_pruning_keeps_the_last_good_checkpoint_while_a_newer_one_is_unverified(tmp_path):
    root = run_with(tmp_path, [2, 4, 6], latest=6)
    ckpt._verified.update({"step-00000002", "step-00000006"})  # resumed from 2 (4 failed), then wrote 6
    ckpt._prune(root, save_total_limit=2, keep="step-00000006")
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000004", "step-00000006"]
    make_checkpoint(root, 8)
    ckpt._verified.add("step-00000008")
    ckpt._prune(root, save_total_limit=2, keep="step-00000008")
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000006", "step-00000008"]
