"""Checkpoints: exact resume, kills at every point of a write, world-size change, mismatches, disk full,
and conversion to Hugging Face safetensors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import REPO, launch, launch_probe_runs, read_metrics, run_cli, write_config

from launcher.env import free_port

pytestmark = pytest.mark.distributed  # starts ranks or the CLI in subprocesses (tests/conftest.py)


SETTINGS = dict(precision="fp32", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=6, save_steps=2,
                shuffle=True, learning_rate=2e-3, weight_decay=0.1, warmup_steps=1, lr_scheduler="cosine", logging_steps=1, seed=3,
                zero_stage="3")  # ZeRO-3's checkpoints here; the other stages' in test_stage_checkpoint_resume_and_convert


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted((run_dir / "final").glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def config(demo_assets, tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("ckpt") / "run.yaml", model_name_or_path=demo_assets.model_dir,
                        train_file=demo_assets.train_file, **SETTINGS)


@pytest.fixture(scope="module")
def baseline(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    launch(["-m", "dpo_ds", "train", "--config", str(config), "--output_dir", str(out)])
    return out


def probe(config, out, env=None, nproc=2, extra=(), check=False):
    return launch(["tests/dist_fault_probe.py", "--config", str(config), "--output_dir", str(out), "--resume_from",
                   "auto", *extra], nproc=nproc, env=env, check=check)


def test_signal_checkpoints_and_resume_is_bitwise_exact(config, baseline, tmp_path):
    out = tmp_path / "run"
    stopped = probe(config, out, env={"FAULT_SIGNAL_AT_STEP": "3"})
    assert stopped.returncode != 0 and "stopped by a signal after step 3" in stopped.stderr
    assert latest(out) == "step-00000003"
    assert not (out / "final").exists()
    resumed = probe(config, out, check=True)
    assert "resumed from step 3" in resumed.stderr
    assert losses(out) == losses(baseline)  # bitwise, every step once
    base = weights(baseline)
    assert all(torch.equal(t, base[n]) for n, t in weights(out).items())


@pytest.mark.parametrize("point", ["during_ds_write", "before_publish", "before_latest"])
def test_kill_during_checkpoint_write_resumes_from_last_good(config, baseline, tmp_path, point):
    out = tmp_path / "run"
    killed = probe(config, out, env={"FAULT_KILL_POINT": point, "FAULT_KILL_STEP": "4"})
    assert killed.returncode != 0
    assert latest(out) == "step-00000002"
    resumed = probe(config, out, check=True)
    assert "resumed from step 2" in resumed.stderr
    assert losses(out) == losses(baseline)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-00000002", "step-00000004", "step-00000006"]


def test_disk_full_is_reported_and_keeps_previous_checkpoint(config, tmp_path):
    out = tmp_path / "run"
    failed = probe(config, out, env={"FAULT_DISK_FULL_STEP": "4"})
    assert failed.returncode != 0
    assert "writing checkpoint" in failed.stderr and "No space left on device" in failed.stderr
    assert latest(out) == "step-00000002"
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000002"]


def uninterrupted(config, out, ranks):
    """A run that is never stopped, at `ranks` ranks with the pairs per step of the 2-rank baseline."""
    finished = launch(["-m", "dpo_ds", "train", "--config", str(config), "--output_dir", str(out),
                       "--gradient_accumulation_steps", str(SETTINGS["gradient_accumulation_steps"] * 2 // ranks)],
                      nproc=ranks)
    # issue 13 item 10: train ends with what it produced and what to run next
    assert f"done: {SETTINGS['max_steps']} steps; last logged loss" in finished.stderr
    assert f"next: dpo-ds eval --model {out / 'final'}" in finished.stderr
    assert f"dpo-ds convert {out / 'checkpoints' / 'step-00000006'} OUT_DIR" in finished.stderr
    return out


@pytest.fixture(scope="module")
def one_rank_run(config, tmp_path_factory):
    return uninterrupted(config, tmp_path_factory.mktemp("whole-1"), 1)


def assert_continues(out: Path, reference: Path, initial: dict[str, torch.Tensor], steps: list[int]) -> None:
    """The resumed run `out` logged `steps` (those after its checkpoint), each loss within 1e-6 relative of the
    uninterrupted run `reference` (at the same world size), and its final weights are within 1e-4 of the total
    update of `reference`'s (rounding: other reduction orders; DeepSpeed 0.19.8's own universal load alone gives
    ~1e-2, see universal_resume.repair_optimizer_state)."""
    got, want = losses(out), losses(reference)
    assert sorted(got) == steps, (out.name, got)
    assert all(abs(got[s] - want[s]) <= 1e-6 * abs(want[s]) for s in got), (out.name, got, want)
    final, base = weights(out), weights(reference)
    gap = sum(float((final[n] - base[n]).double().square().sum()) for n in base) ** 0.5
    update = sum(float((base[n] - initial[n]).double().square().sum()) for n in base) ** 0.5
    assert gap <= 1e-4 * update, (out.name, gap / update)


def initial_weights(demo_assets) -> dict[str, torch.Tensor]:
    return load_file(str(next(Path(demo_assets.model_dir).glob("*.safetensors"))))


def test_resume_at_another_world_size_continues_the_run(config, baseline, one_rank_run, demo_assets, tmp_path):
    """2 -> 1, 1 -> 2 and 2 -> 4 ranks through the universal checkpoint, resumed after step 2, continue the
    uninterrupted run at the new world size (assert_continues)."""
    runs = {2: baseline, 1: one_rank_run, 4: uninterrupted(config, tmp_path / "whole-4", 4)}
    for saved_at, resumed_at in ((2, 1), (1, 2), (2, 4)):
        out = tmp_path / f"resumed-{saved_at}-to-{resumed_at}"
        shutil.copytree(runs[saved_at] / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000002")
        (out / "checkpoints" / "latest").write_text("step-00000002\n")
        resumed = probe(config, out, nproc=resumed_at, check=True, extra=(
            "--gradient_accumulation_steps", str(SETTINGS["gradient_accumulation_steps"] * 2 // resumed_at)))
        assert "resumed from step 2" in resumed.stderr
        assert (out / "checkpoints" / "step-00000002" / "ds_universal").is_dir()
        assert_continues(out, runs[resumed_at], initial_weights(demo_assets), [3, 4, 5, 6])


def test_resume_across_zero_stages(config, baseline, one_rank_run, demo_assets, tmp_path):
    """Issue 23: a run stopped at one ZeRO stage continues at another, through the universal checkpoint, also at
    another world size. On 2 ranks (one launch): ZeRO-3's step 2 resumed at stage 0 (3 -> 0), that run's step 4
    at stage 3 (0 -> 3), ZeRO-3's step 2 at stage 2 (3 -> 2); on 1 rank (one launch): that stage-2 run's step 4
    at stage 1 and at stage 3 (2 -> 1, 2 -> 3). Each continues the uninterrupted run at its world size
    (assert_continues); a checkpoint's universal layout, written once, serves every stage that resumes it."""
    def run(name: str, stage: str, resume_from: str, ranks: int) -> tuple[Path, Path]:
        fields = {**SETTINGS, "zero_stage": stage, "resume_from": resume_from, "output_dir": str(tmp_path / name),
                  "gradient_accumulation_steps": SETTINGS["gradient_accumulation_steps"] * 2 // ranks}
        return write_config(tmp_path / f"{name}.yaml", model_name_or_path=demo_assets.model_dir,
                            train_file=demo_assets.train_file, **fields), tmp_path / f"{name}.pt"

    def checkpoint(name: str, step: int) -> str:
        return str(tmp_path / name / "checkpoints" / f"step-{step:08d}")

    shutil.copytree(baseline / "checkpoints" / "step-00000002", checkpoint("3-to-0", 2))
    (tmp_path / "3-to-0" / "checkpoints" / "latest").write_text("step-00000002\n")
    two = [run("3-to-0", "0", "auto", 2), run("0-to-3", "3", checkpoint("3-to-0", 4), 2),
           run("3-to-2", "2", checkpoint("3-to-0", 2), 2)]
    one = [run("2-to-1", "1", checkpoint("3-to-2", 4), 1), run("2-to-3", "3", checkpoint("3-to-2", 4), 1)]
    logs = launch_probe_runs(two, tmp_path / "two.json", nproc=2) + launch_probe_runs(one, tmp_path / "one.json", nproc=1)
    initial = initial_weights(demo_assets)
    for (cfg, probe_file), log, first_step, converts in zip(two + one, logs, (2, 4, 2, 4, 4), (3, 0, None, 2, None)):
        stage = int(cfg.stem.split("-")[-1])
        assert f"resumed from step {first_step}" in log and f"policy engine: ZeRO stage {stage}" in log, log[-3000:]
        assert torch.load(probe_file, weights_only=True)["policy_resolved"]["zero_stage"] == stage
        # the first run to resume a checkpoint at another stage converts it; the next one reuses the layout
        assert ("to a universal checkpoint" in log) == (converts is not None), log[-3000:]
        assert converts is None or f"(ZeRO stage {converts}) to a universal checkpoint" in log
        reference = baseline if (cfg, probe_file) in two else one_rank_run
        assert_continues(tmp_path / cfg.stem, reference, initial, list(range(first_step + 1, SETTINGS["max_steps"] + 1)))


def test_resume_with_changed_data_fails_with_fingerprint_message(config, baseline, demo_assets, tmp_path):
    changed = tmp_path / "train.jsonl"
    rows = Path(demo_assets.train_file).read_text().splitlines()
    row = json.loads(rows[5])
    row["chosen"] += " indeed"
    changed.write_text("\n".join(rows[:5] + [json.dumps(row)] + rows[6:]) + "\n")
    out = tmp_path / "run"
    shutil.copytree(baseline / "checkpoints", out / "checkpoints")
    failed = probe(config, out, extra=("--train_file", str(changed)))
    assert failed.returncode != 0
    assert "the training data changed (fingerprint" in failed.stderr


def test_truncated_or_missing_shard_is_named(baseline, tmp_path):
    ckpt = tmp_path / "step-00000006"
    shutil.copytree(baseline / "checkpoints" / "step-00000006", ckpt)
    shard = next((ckpt / "ds").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    failed = run_cli(["convert", str(ckpt), str(tmp_path / "hf")], check=False)
    assert failed.returncode == 2 and f"{shard}: truncated" in failed.stderr
    shard.unlink()
    failed = run_cli(["convert", str(ckpt), str(tmp_path / "hf")], check=False)
    assert failed.returncode == 2 and f"{shard}: missing" in failed.stderr
    assert not (tmp_path / "hf").exists()


def test_convert_round_trip_matches_final_export(baseline, tmp_path):
    hf = tmp_path / "hf"
    run_cli(["convert", str(baseline / "checkpoints" / "step-00000006"), str(hf), "--dtype", "fp32",
             "--max_shard_size", "1MB"])
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    converted, final = {}, weights(baseline)
    for shard in shards:
        converted.update(load_file(str(hf / shard)))
    assert converted.keys() == final.keys()
    assert all(torch.equal(converted[n], final[n]) for n in final)
    probe_ids = torch.tensor([[1, 7, 9, 30, 41, 2]])
    a = AutoModelForCausalLM.from_pretrained(hf).eval()
    b = AutoModelForCausalLM.from_pretrained(baseline / "final").eval()
    with torch.no_grad():
        assert torch.equal(a(input_ids=probe_ids).logits, b(input_ids=probe_ids).logits)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (hf / name).is_file()


def test_ctrl_c_on_torchrun_checkpoints_quietly(demo_assets, tmp_path):
    """Issue 13 items 4, 5 and 8. Ctrl-C on a torchrun run (SIGINT to its whole process group, as a terminal sends
    it; torchrun forwards a copy to its workers) finishes the step, checkpoints and stops like SIGTERM, without
    KeyboardInterrupt tracebacks (was ~180 lines and no checkpoint). The run prints no deprecation warning (was
    hundreds), and a config without `precision` trains in fp32 on a CPU, recorded in run_config.json."""
    config = write_config(tmp_path / "run.yaml", model_name_or_path=demo_assets.model_dir, logging_steps=1,
                          train_file=demo_assets.train_file, micro_batch_size=2, max_steps=20)
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "dpo_ds", "train", "--config", str(config), "--output_dir", str(out)]
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.2)  # until the first step is logged
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    text = log.read_text()
    step = int(latest(out).split("-")[1])
    assert 1 <= step < 20 and "received SIGINT" in text and f"stopped by a signal after step {step}" in text, text[-3000:]
    assert "KeyboardInterrupt" not in text
    assert not [line for line in text.splitlines() if "deprecat" in line.lower()]
    assert json.loads((out / "run_config.json").read_text())["precision"] == "fp32"


def test_second_ctrl_c_stops_at_once(tmp_path):
    """Issue 13 item 5: the first Ctrl-C (and torchrun's copy of it) asks for a checkpoint; a second one exits now."""
    script = "\n".join([
        "import os, signal, time",
        "from dpo_ds.stop_signal import StopSignal",
        "stop = StopSignal()",
        "os.kill(os.getpid(), signal.SIGINT)",
        "os.kill(os.getpid(), signal.SIGINT)  # torchrun's forwarded copy of the same Ctrl-C",
        "time.sleep(0.2)",
        "print('first:', stop.received, flush=True)",
        "time.sleep(StopSignal.REPEAT_WINDOW_S + 0.5)",
        "os.kill(os.getpid(), signal.SIGINT)",
        "time.sleep(60)",
        "print('still running', flush=True)",
    ])
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stdout == f"first: {int(signal.SIGINT)}\n", (proc.stdout, proc.stderr)
    assert "stopping now, without a checkpoint" in proc.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dpo-ds train: error:")]


def test_finished_run_is_never_overwritten(config, tmp_path):
    """Issue 24 item 1: a finished run without checkpoints (save_steps 0) was replaced by the same command
    (final/, run_config.json, metrics.jsonl truncated, a second TensorBoard file) and retrained by
    --resume_from auto. Now: refused, or 'finished' with exit 0, the folder byte for byte as it was; only
    --overwrite true replaces it, saying what it replaces."""
    out = tmp_path / "run"
    command = ["-m", "dpo_ds", "train", "--config", str(config), "--output_dir", str(out), "--save_steps", "0",
               "--max_steps", "2"]
    launch(command)
    before = snapshot(out)
    again = launch(command, check=False)
    assert again.returncode != 0 and len(error_lines(again.stderr)) == 1, again.stderr[-3000:]
    assert "holds a finished run (2 steps" in again.stderr and "--overwrite true" in again.stderr
    resumed = launch([*command, "--resume_from", "auto"], check=False)
    assert resumed.returncode == 0 and "holds a finished run" in resumed.stderr and "nothing to do" in resumed.stderr
    assert snapshot(out) == before
    assert json.loads((out / "run_finished.json").read_text())["steps"] == 2
    replaced = launch([*command, "--overwrite", "true"])
    assert "--overwrite true: removing the previous run's final/, run_config.json, metrics.jsonl, tensorboard/" \
        in replaced.stderr
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2]


def optimizer_file(ckpt: Path, rank: int) -> Path:
    return next((ckpt / "ds").glob(f"*zero_pp_rank_{rank}_*optim_states.pt"))


def test_same_size_corruption_is_refused_by_convert_and_skipped_by_resume(config, baseline, tmp_path):
    """Issue 24 item 2: 256 bytes overwritten inside a rank's optimizer file (size unchanged) resumed silently
    and exported garbage. Now convert refuses it, naming the file, and --resume_from auto falls back to the
    previous checkpoint and continues the run exactly."""
    out = tmp_path / "run"
    shutil.copytree(baseline / "checkpoints", out / "checkpoints")
    bad = optimizer_file(out / "checkpoints" / "step-00000006", 1)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2:len(data) // 2 + 256] = bytes(256)
    bad.write_bytes(bytes(data))
    refused = run_cli(["convert", str(bad.parent.parent), str(tmp_path / "hf")], check=False)
    assert refused.returncode == 2 and f"{bad}: contents altered" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "hf").exists()
    resumed = probe(config, out, check=True)
    assert f"{bad}: contents altered" in resumed.stderr and "resuming from" in resumed.stderr
    assert "resumed from step 4" in resumed.stderr
    assert losses(out) == {s: loss for s, loss in losses(baseline).items() if s > 4}
    base = weights(baseline)
    assert all(torch.equal(t, base[n]) for n, t in weights(out).items())


def test_truncated_newest_checkpoint_falls_back_across_requeues(config, baseline, tmp_path):
    """Issue 24 item 3: a truncated newest checkpoint failed every restart of a requeued job. An explicit path
    to it names the newest good one; auto falls back to it, repairs `latest`, and the requeued restarts that
    follow (stopped by a signal, started again) end as the uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(baseline / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / "step-00000006"
    shard = optimizer_file(newest, 0)
    shard.write_bytes(shard.read_bytes()[:1000])
    explicit = probe(config, out, extra=("--resume_from", str(newest)))
    assert explicit.returncode != 0 and len(error_lines(explicit.stderr)) == 1, explicit.stderr[-3000:]
    assert f"{shard}: truncated" in explicit.stderr
    assert f"newest checkpoint beside it that verifies is {out / 'checkpoints' / 'step-00000004'}" in explicit.stderr
    first = probe(config, out, env={"FAULT_SIGNAL_AT_STEP": "5"})
    assert first.returncode != 0 and "resumed from step 4" in first.stderr
    assert f"{shard}: truncated" in first.stderr and "checkpoints/latest now names it" in first.stderr
    assert latest(out) == "step-00000005", first.stderr[-5000:]
    second = probe(config, out, check=True)
    assert "resumed from step 5" in second.stderr
    assert losses(out) == {s: loss for s, loss in losses(baseline).items() if s > 4}
    base = weights(baseline)
    assert all(torch.equal(t, base[n]) for n, t in weights(out).items())


def test_disk_full_on_one_rank_stops_at_once_with_one_line(config, tmp_path):
    """Issue 24 item 4: ENOSPC on one rank's checkpoint file left the other rank in a barrier until
    dist_timeout_s, then raw gloo errors. Now every rank agrees on the failure first: one error line naming the
    file, the partial directory gone, `latest` intact. dist_timeout_s is far above the launch's time limit, so
    a rank left waiting fails the test. The same for the final export."""
    out = tmp_path / "run"
    failed = probe(config, out, env={"FAULT_DISK_FULL_STEP": "4", "FAULT_DISK_FULL_RANK": "1"},
                   extra=("--dist_timeout_s", "3000"))
    lines = error_lines(failed.stderr)
    assert len(lines) == 1, failed.stderr[-5000:]
    line = lines[0]
    assert failed.returncode != 0 and "OSError" not in failed.stderr, failed.stderr[-3000:]
    assert line.startswith(f"dpo-ds train: error: {out / 'checkpoints' / 'step-00000004.tmp' / 'ds'}")
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: No space left on device (rank 1" in line
    assert latest(out) == "step-00000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    export_out = tmp_path / "export"
    failed = probe(config, export_out, env={"FAULT_EXPORT_DISK_FULL": "1"}, extra=("--dist_timeout_s", "3000"))
    lines = error_lines(failed.stderr)
    assert len(lines) == 1, failed.stderr[-5000:]
    line = lines[0]
    assert failed.returncode != 0 and "OSError" not in failed.stderr, failed.stderr[-3000:]
    assert line.startswith(f"dpo-ds train: error: {export_out / 'final.tmp'}") and "No space left on device" in line
    assert not (export_out / "final").exists() and not (export_out / "final.tmp").exists()
    assert not (export_out / "run_finished.json").exists() and latest(export_out) == "step-00000006"


@pytest.mark.parametrize("stage", ["0", "2"])
def test_stage_checkpoint_resume_and_convert(config, baseline, tmp_path, stage):
    """The whole-model stages' checkpoints (0: no ZeRO optimizer; 2: ZeRO-1/2's partitioned optimizer): stopped
    after step 3 and resumed, the run is ZeRO-3's uninterrupted one (same math, other reduction order: 1e-6);
    `dpo-ds convert` of its last checkpoint is its final export exactly. (Resuming at another stage:
    test_resume_across_zero_stages.)"""
    out = tmp_path / "run"
    stage_flag = ("--zero_stage", stage)
    stopped = probe(config, out, env={"FAULT_SIGNAL_AT_STEP": "3"}, extra=stage_flag)
    assert stopped.returncode != 0 and "stopped by a signal after step 3" in stopped.stderr
    assert f"policy engine: ZeRO stage {stage} (set by zero_stage)" in stopped.stderr
    resumed = probe(config, out, check=True, extra=stage_flag)
    assert "resumed from step 3" in resumed.stderr
    got, want = losses(out), losses(baseline)
    assert sorted(got) == sorted(want) and all(abs(got[s] - want[s]) <= 1e-6 for s in got), (got, want)
    final, base = weights(out), weights(baseline)
    assert max(float((final[n] - base[n]).abs().max()) for n in base) < 1e-5
    hf = tmp_path / "hf"
    run_cli(["convert", str(out / "checkpoints" / "step-00000006"), str(hf), "--dtype", "fp32"])
    converted = {}
    for shard in hf.glob("*.safetensors"):
        converted.update(load_file(str(shard)))
    assert converted.keys() == final.keys() and all(torch.equal(converted[n], final[n]) for n in final)
