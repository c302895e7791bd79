"""Run `dpo-ds ARGS` with every chunk of rows taking SLOW_PREPARE_S seconds longer to tokenize (a test hook:
a preparation that outlasts dist_timeout_s on a tiny file); with SLOW_PREPARE_STARTED set, that file is created
when the first chunk starts (a test can then kill or stop the preparing rank)."""
import os
import sys
import time
from pathlib import Path

from dpo_ds.data.tokenize import ChunkTokenizer
from dpo_ds.cli import entry

tokenize_chunk = ChunkTokenizer.__call__


def slow_chunk(self, chunk):
    if os.environ.get("SLOW_PREPARE_STARTED"):
        Path(os.environ["SLOW_PREPARE_STARTED"]).touch()
    time.sleep(float(os.environ["SLOW_PREPARE_S"]))
    return tokenize_chunk(self, chunk)


ChunkTokenizer.__call__ = slow_chunk  # tokenizer processes are forked: they inherit the patch
sys.argv = ["dpo-ds", *sys.argv[1:]]
entry()
