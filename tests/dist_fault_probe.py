"""`dpo-ds train` under torchrun with one injected fault, chosen by environment variables (tests only):

FAULT_SIGNAL_AT_STEP=K            rank 0 sends itself SIGUSR1 while running step K (1-based)
FAULT_KILL_POINT=P FAULT_KILL_STEP=K
                                  rank 0 SIGKILLs itself while saving checkpoint step K, at point P:
                                  during_ds_write (model states written, optimizer partitions not),
                                  before_publish (all files written, no manifest, not renamed),
                                  before_latest (renamed, `latest` still names the previous one)
FAULT_DISK_FULL_STEP=K            every rank's DeepSpeed save of step K fails with ENOSPC
FAULT_DISK_FULL_STEP=K FAULT_DISK_FULL_RANK=R
                                  only rank R's optimizer file of step K: part written, then ENOSPC
FAULT_EXPORT_DISK_FULL=1          the final export's second tensor fails with ENOSPC (rank 0 writes it)
FAULT_NAN_AT_STEPS=K[,K...]       rank 0's policy log-probs become NaN in the training forwards of these steps
"""
import errno
import os
import signal
import sys

import deepspeed
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

import dpo_ds.checkpoint as ckpt
import dpo_ds.safetensors_io as safetensors_io
import dpo_ds.scoring as scoring
from dpo_ds.cli import main
from launcher.dist import exit_process
from dpo_ds.data import PairSampler


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def saving_step(path) -> int:
    return int(str(path).rstrip("/").split("step-")[-1].split(".")[0])


signal_at = int(os.environ.get("FAULT_SIGNAL_AT_STEP", "0"))
current_step = [0]  # 1-based step the trainer is running
original_micro_batches = PairSampler.micro_batches


def micro_batches(self, step, r):
    current_step[0] = step + 1
    if step + 1 == signal_at and rank() == 0:
        os.kill(os.getpid(), signal.SIGUSR1)
    return original_micro_batches(self, step, r)


PairSampler.micro_batches = micro_batches

nan_steps = {int(k) for k in os.environ.get("FAULT_NAN_AT_STEPS", "").split(",") if k}
if nan_steps:
    original_forward_logps = scoring.forward_logps

    def forward_logps(engine, batch, chunk_size, head, router_aux=False, wpo=False):
        logps, *rest = original_forward_logps(engine, batch, chunk_size, head, router_aux, wpo)
        if logps.requires_grad and current_step[0] in nan_steps and rank() == 0:
            logps = logps + float("nan")
        return logps, *rest

    scoring.forward_logps = forward_logps

kill_point, kill_step = os.environ.get("FAULT_KILL_POINT"), int(os.environ.get("FAULT_KILL_STEP", "0"))
Engine = deepspeed.runtime.engine.DeepSpeedEngine
if kill_point == "during_ds_write":
    original_zero = Engine._save_zero_checkpoint

    def save_zero(self, save_path, tag):
        if rank() == 0 and saving_step(save_path) == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_zero(self, save_path, tag)

    Engine._save_zero_checkpoint = save_zero
elif kill_point == "before_publish":
    original_fsync = ckpt.fsync_tree

    def fsync_tree(root):
        if saving_step(root) == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_fsync(root)

    ckpt.fsync_tree = fsync_tree
elif kill_point == "before_latest":
    original_write = ckpt.write_text_atomic

    def write_text(path, text):
        if path.name == ckpt.LATEST and saving_step(text) == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_write(path, text)

    ckpt.write_text_atomic = write_text

disk_full_step = int(os.environ.get("FAULT_DISK_FULL_STEP", "0"))
disk_full_rank = os.environ.get("FAULT_DISK_FULL_RANK")
if disk_full_step and disk_full_rank is not None:
    original_engine_save = TorchCheckpointEngine.save

    def engine_save(self, state_dict, path):
        name = getattr(path, "name", path)  # dpo-ds hands DeepSpeed an open file, DeepSpeed alone a path
        if rank() == int(disk_full_rank) and saving_step(name) == disk_full_step and "optim_states" in str(name):
            if hasattr(path, "write"):
                path.write(b"\0" * 4096)
            else:
                with open(path, "wb") as fh:
                    fh.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write through a file object raises it
        return original_engine_save(self, state_dict, path)

    TorchCheckpointEngine.save = engine_save
elif disk_full_step:
    original_save = Engine.save_checkpoint

    def save_checkpoint(self, save_dir, *args, **kwargs):
        if saving_step(save_dir) == disk_full_step:
            raise OSError(errno.ENOSPC, "No space left on device", save_dir)
        return original_save(self, save_dir, *args, **kwargs)

    Engine.save_checkpoint = save_checkpoint

if os.environ.get("FAULT_EXPORT_DISK_FULL"):
    original_add = safetensors_io.ShardWriter.add

    def add(self, name, tensor):
        if self.entries:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.data.name))
        return original_add(self, name, tensor)

    safetensors_io.ShardWriter.add = add

exit_process(main(["train", *sys.argv[1:]]))  # as the dpo-ds entry point does
