"""The `dpo-ds` entry point: results alone on stdout, `eval` of a run's model, DeepSpeed's op build (issue 13)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import launcher.__main__ as launcher_main
from dpo_ds import cli, compiled_ops, console, versions
from helpers import launch, write_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.distributed
def test_eval_of_a_runs_model_uses_its_settings_and_prints_only_json(demo_assets, tmp_path):
    """Items 6 and 10 of issue 16: DeepSpeed's 'built successfully' line came before the JSON on stdout; eval scored
    with beta 0.1 unless the training beta was repeated, and wrote eval_pairs.jsonl into the current directory.
    Issue 25 item 2: without --ref_model it scored without the run's reference (accuracy 0.02 for a model that
    scores 1.0 with it), and a second eval overwrote the first one's file."""
    run = tmp_path / "run"
    shutil.copytree(demo_assets.model_dir, run / "final")
    (run / "run_config.json").write_text(json.dumps({"beta": 0.5, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                                     "model_name_or_path": demo_assets.model_dir}))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    def evaluate(*extra):
        return subprocess.run([sys.executable, "-m", "dpo_ds", "eval", "--model", str(run / "final"), "--data",
                               demo_assets.heldout_file, *extra], cwd=cwd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})

    for extra, name, with_reference in (((), "eval_pairs_heldout.jsonl", True),
                                        (("--ref_model", "none"), "eval_pairs_heldout-2.jsonl", False)):
        proc = evaluate(*extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout)  # nothing else on stdout
        assert summary["beta"] == 0.5 and summary["per_pair_file"] == str(run / name)  # a new file each time
        assert summary["ref_model"] == (demo_assets.model_dir if with_reference else None)
        records = [json.loads(line) for line in (run / name).read_text().splitlines()]
        assert len(records) == summary["pairs"] > 0
        for r in records:  # r = beta (logp - ref logp); the run's reference is the model itself here
            ref = r["ref_chosen_logp"] if with_reference else 0.0
            assert abs(r["chosen_reward"] - 0.5 * (r["policy_chosen_logp"] - ref)) < 1e-4
            assert (abs(r["chosen_reward"]) < 1e-4) == with_reference
    assert list(cwd.iterdir()) == []
    first = (run / "eval_pairs_heldout.jsonl").read_text()
    refused = evaluate("--output", str(run / "eval_pairs_heldout.jsonl"))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"dpo-ds eval: error: --output {run / 'eval_pairs_heldout.jsonl'}: the file exists; pass --overwrite to "
        f"replace it")
    assert (run / "eval_pairs_heldout.jsonl").read_text() == first


def test_results_go_to_stdout_and_everything_else_to_stderr(capfd):
    """Item 6: what a command prints while it runs (Python or C) goes to stderr, its result to stdout."""
    with console.stdout_for_results_only():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        os.write(1, b"ninja output\n")
        console.emit('{"accuracy": 1.0}')
    out, err = capfd.readouterr()
    assert out == '{"accuracy": 1.0}\n'
    assert "built successfully" in err and "ninja output" in err


def test_ops_build_once_per_environment_with_a_message(tmp_path, monkeypatch, capsys):
    """Item 7: outside `make` TORCH_EXTENSIONS_DIR was unset and the CPU op was compiled again, silently."""
    assert compiled_ops.default_extensions_dir() == str(Path(sys.prefix) / "torch_extensions")  # the Makefile's .venv one
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    compiled_ops.announce_op_build()
    assert f"building DeepSpeed op(s) deepspeed_shm_comm into {tmp_path}" in capsys.readouterr().err
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    compiled_ops.announce_op_build()
    assert capsys.readouterr().err == ""


USERS_SHELL_LOADS_THE_OP = r"""
import os, sys
from deepspeed.accelerator import get_accelerator
from dpo_ds import cli
seen = {}
cli.run_command = lambda name, module, args: seen.update(dir=os.environ["TORCH_EXTENSIONS_DIR"]) or 0
cli.main(["prepare", "--config", "run.yaml"])  # what every command sets up before it runs
op = get_accelerator().create_op_builder("ShareMemCommBuilder").load()  # what DeepSpeed's process group loads
print(seen["dir"])
print(op.__file__)
"""


@pytest.mark.distributed
def test_a_users_shell_reuses_the_op_that_make_built(tmp_path):
    """Issue 25 item 3: `make demo` built DeepSpeed's shm op into TORCH_EXTENSIONS_DIR, which the Makefile exports
    (.venv/torch_extensions); the user's own `dpo-ds train` from a shell without it compiled the op again into
    ~/.cache/torch_extensions. A process without TORCH_EXTENSIONS_DIR, started elsewhere, loads the environment's
    build (building it here only if no test built it yet) and leaves it as it was."""
    built_by_make = Path(sys.prefix) / "torch_extensions"
    library = built_by_make / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    runs = []
    for _ in range(2):  # the first may build it (a fresh environment); the second must load that build
        proc = subprocess.run([sys.executable, "-c", USERS_SHELL_LOADS_THE_OP], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((proc.stdout.strip().splitlines()[-2:], library.stat().st_mtime_ns))
    assert runs[0][0] == runs[1][0] == [str(built_by_make), str(library)]
    assert runs[1][1] == runs[0][1]  # not rebuilt


def test_op_builds_are_reported_once_and_deepspeeds_per_start_line_dropped(tmp_path, monkeypatch, capsys):
    """Issue 25 items 3 and 4: a start that compiled an op sat silent for a minute, and every start of every rank
    printed DeepSpeed's 'built successfully' whether or not anything was built."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    library = tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    with compiled_ops.reporting_op_builds():  # DeepSpeed compiles the op: the library appears
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        library.parent.mkdir()
        library.write_bytes(b"")
    assert capsys.readouterr().err.splitlines() == [
        f"dpo-ds: built DeepSpeed op(s) deepspeed_shm_comm into {tmp_path} in 0 s"]
    with compiled_ops.reporting_op_builds():  # the next start loads it: nothing to say
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert capsys.readouterr() == ("", "")


@pytest.mark.distributed
def test_makefile_installs_deepspeed_from_the_range_in_setup_cfg():
    """Issue 14: setup.cfg put no upper bound on deepspeed while the Makefile did; now the Makefile reads it."""
    ranges = versions.tested_ranges()
    assert {name: versions.pip_spec(r) for name, r in ranges.items()} == {
        "deepspeed": "deepspeed>=0.19.8,<0.20", "transformers": "transformers>=5.17,<6"}
    make = subprocess.run(["make", "-n", "-B", "install"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert f'install -q --no-build-isolation "{versions.pip_spec(ranges["deepspeed"])}"' in make.stdout


def test_versions_outside_the_tested_ranges_stop_every_entry_point(monkeypatch, capsys, tmp_path):
    """Issue 14: nothing said when an installed deepspeed or transformers was one dpo-ds was never tested with."""
    assert versions.version_problems() == []  # this environment is a tested one
    # a wheel install has no setup.cfg: the ranges come from the installed metadata
    monkeypatch.setattr(versions.importlib.metadata, "requires",
                        lambda name: ["torch>=2.4", "deepspeed>=0.19.8,<0.20", 'transformers>=9; extra == "test"'])
    assert {n: versions.pip_spec(r) for n, r in versions.tested_ranges(tmp_path / "setup.cfg").items()} == {
        "deepspeed": "deepspeed>=0.19.8,<0.20"}

    installed = {"deepspeed": "0.20.1", "transformers": "5.24.0"}
    monkeypatch.setattr(versions, "installed_version", installed.get)
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    expected = ('error: deepspeed 0.20.1 is installed, but dpo-ds is tested with deepspeed>=0.19.8,<0.20: run '
                '`make install`, or pip install --no-build-isolation "deepspeed>=0.19.8,<0.20"')
    monkeypatch.setattr(cli, "exit_process", lambda code: sys.exit(code))  # in this process: no os._exit
    # `python -m launcher` runs the dpo-ds program, whose own check stops it
    for entry, program in ((lambda: cli.main(["plan", "--model", "llama-7b"]), "dpo-ds plan"),
                           (lambda: launcher_main.main(["plan", "--model", "llama-7b"]), "dpo-ds plan")):
        assert entry() == 2
        out, err = capsys.readouterr()
        assert f"{program}: {expected}" in err and out == ""  # stopped before the command ran
    monkeypatch.setenv(versions.ALLOW_ENV, "1")  # run anyway, with a warning
    assert cli.main(["plan", "--model", "llama-7b"]) == 0
    assert "dpo-ds plan: warning: deepspeed 0.20.1 is installed" in capsys.readouterr().err

    installed["transformers"] = None  # missing: no override helps
    assert cli.main(["plan", "--model", "llama-7b"]) == 2
    assert ('error: transformers is not installed; dpo-ds needs transformers>=5.17,<6: run `make install`'
            in capsys.readouterr().err)


def test_eval_keeps_the_scored_model_on_the_device_whatever_ref_offload_says(tmp_path):
    """Issue 20, finding 3: the scored model was built with the reference's config, offloaded to CPU by default."""
    from dpo_ds.engines import resolve_reference_config
    from dpo_ds.evaluate import add_arguments, eval_config, scored_model_config

    for path in ("m", "r"):
        (tmp_path / path).mkdir()
        (tmp_path / path / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text("")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = eval_config(parser.parse_args(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
                                         "--ref_model", str(tmp_path / "r")]))
    assert cfg.ref_offload is True  # the default: the reference stays offloaded
    assert resolve_reference_config(cfg, 64)["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert scored_model_config(cfg, 64)["zero_optimization"]["offload_param"]["device"] == "none"


@pytest.mark.parametrize("argv,flag,suggestion", [
    (["train", "--learning_rat", "1e-6"], "--learning_rat", "--learning_rate"),  # a prefix of a flag: not taken
    (["eval", "--modl", "m", "--data", "d"], "--modl", "--model"),  # named before the missing --model
    (["plan", "--model", "llama-7b", "--node", "2"], "--node", "--nodes"),
])
def test_a_mistyped_flag_is_one_line_with_the_closest_flag(argv, flag, suggestion, capsys):
    """Issue 25 item 6: argparse printed the whole usage and took `--learning_rat` as `--learning_rate`."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.splitlines() == [f"dpo-ds {argv[0]}: error: unknown flag {flag} (did you mean {suggestion}?); "
                                f"`dpo-ds {argv[0]} --help` lists the flags"]


@pytest.mark.distributed
def test_bad_input_under_torchrun_is_one_line_and_the_agents_summary_carries_it(tmp_path):
    """Issue 25 item 1: each rank printed the error, and torchrun's summary showed no cause. Now the first rank to
    fail prints the line (the agent stops the others) and every failed rank's error file (TORCHELASTIC_ERROR_FILE)
    holds it for the agent's summary."""
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tmp_path / 'no_model'}\ntrain_file: {tmp_path / 'no.jsonl'}\n")
    proc = launch(["-m", "dpo_ds", "train", "--config", str(config)], check=False, timeout=300)
    line = f"dpo-ds train: error: field 'train_file': {tmp_path / 'no.jsonl'}: no such file or directory"
    assert proc.returncode != 0
    assert [x for x in proc.stderr.splitlines() if x.startswith("dpo-ds train: error:")] == [line]
    summary = proc.stderr[proc.stderr.index("Root Cause"):]
    assert f"traceback : {line}" in summary


@pytest.mark.distributed
def test_bad_input_under_the_deepspeed_launcher_is_one_line_and_exit_status_2(tmp_path):
    """Issue 25 item 1 under `deepspeed` (the launcher stops the other ranks and exits with the failed rank's
    status): dpo-ds's one line, then the launcher's one `exits with return code = 2` line; no traceback."""
    from launcher.env import free_port

    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tmp_path / 'no_model'}\ntrain_file: {tmp_path / 'no.jsonl'}\n")
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "--module", "dpo_ds", "train", "--config",
                           str(config)], capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).splitlines()
    line = f"dpo-ds train: error: field 'train_file': {tmp_path / 'no.jsonl'}: no such file or directory"
    assert proc.returncode == 2, "\n".join(lines[-30:])
    assert [x for x in lines if x.startswith("dpo-ds train: error:")] == [line]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == line  # the launcher logs to stdout
    assert proc.stdout.strip().splitlines()[-1].endswith("exits with return code = 2"), proc.stdout[-3000:]


def test_nproc_per_node_is_refused_inside_a_launcher_and_leaves_the_ranks_command_without_it(monkeypatch, capsys):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # LOCAL_RANK: set by an earlier test's --local_rank
        monkeypatch.delenv(name, raising=False)
    started = []
    monkeypatch.setattr(cli, "run_local_ranks", lambda nproc, command: started.append((nproc, command)) or 0)
    assert cli.main(["train", "--config", "run.yaml", "--nproc_per_node", "4", "--beta", "0.2"]) == 0
    assert cli.main(["train", "--nproc_per_node=2", "--config", "run.yaml"]) == 0
    assert started == [(4, [sys.executable, "-m", "dpo_ds", "train", "--config", "run.yaml", "--beta", "0.2"]),
                       (2, [sys.executable, "-m", "dpo_ds", "train", "--config", "run.yaml"])]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--config", "run.yaml", "--nproc_per_node", "2"]) == 2
    assert capsys.readouterr().err.startswith("dpo-ds train: error: --nproc_per_node starts the ranks itself, and "
                                              "this process is already a rank of a launcher")
    assert len(started) == 2


@pytest.mark.distributed
def test_nproc_per_node_starts_the_ranks_and_returns_dpo_ds_status(demo_assets, tmp_path):
    """Issue 25: `dpo-ds train --nproc_per_node N` launches the ranks itself. Bad input: one line, status 2. A
    SIGTERM to the command (Slurm's, or a kill) reaches every rank: they checkpoint after their step and the
    command exits 75."""
    config = tmp_path / "bad.yaml"
    config.write_text(f"model_name_or_path: {tmp_path / 'no_model'}\ntrain_file: {tmp_path / 'no.jsonl'}\n")
    proc = subprocess.run([sys.executable, "-m", "dpo_ds", "train", "--nproc_per_node", "2", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    line = f"dpo-ds train: error: field 'train_file': {tmp_path / 'no.jsonl'}: no such file or directory"
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-3000:]
    assert [x for x in proc.stderr.splitlines() if "error:" in x] == [line] and "Traceback" not in proc.stderr

    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "dpo_ds", "train", "--nproc_per_node=2", "--config",
                            str(write_config(tmp_path / "run.yaml", model_name_or_path=demo_assets.model_dir,
                                             train_file=demo_assets.train_file, output_dir=str(out),
                                             precision="fp32", micro_batch_size=1, max_steps=500, logging_steps=1,
                                             max_length=64))],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert run.poll() is None, run.communicate()[1][-3000:]
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 75, err[-3000:]
    step = int(re.search(r"stopped by a signal after step (\d+)", err)[1])
    state = json.loads((out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())
    assert state["step"] == step and state["world_size"] == 2 and "Traceback" not in err, err[-3000:]


def test_train_check_validates_everything_before_engines_and_trains_nothing(demo_assets, tmp_path, capsys):
    """Issue 25: `dpo-ds train --check` (before an sbatch) finds config, data and checkpoint problems in one
    process and says what the run would train on; it starts no engine and writes no run."""
    out = tmp_path / "run"
    flags = ["--model_name_or_path", demo_assets.model_dir, "--eval_file", demo_assets.heldout_file,
             "--output_dir", str(out), "--micro_batch_size", "4", "--prepare_workers", "1"]
    assert cli.main(["train", "--check", "--train_file", demo_assets.train_file, *flags]) == 0
    n = sum(1 for line in open(demo_assets.train_file) if line.strip())
    assert capsys.readouterr().out.splitlines() == [
        f"check passed: {demo_assets.train_file}: {n} pairs; 4 pairs per data-parallel rank per optimizer step: "
        f"{n // 4} steps per epoch on 1 rank, {n // 32} on 8",
        f"  eval: {demo_assets.heldout_file}: {sum(1 for line in open(demo_assets.heldout_file) if line.strip())} pairs",
        f"  a new run in {out}"]
    assert sorted(p.name for p in out.iterdir()) == ["caches"]  # the prepared data only: no run_config, no model
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(demo_assets.train_file).readline() + '{"prompt": "q", "chosen": "a"}\n')
    assert cli.main(["train", "--check", "--train_file", str(bad), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"dpo-ds train: error: {bad}:2: field 'rejected': missing"
