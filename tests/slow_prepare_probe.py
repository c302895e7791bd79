"""Run `dpo-ds ARGS` with every chunk of rows taking SLOW_PREPARE_S seconds longer to tokenize (a test hook:
a preparation that outlasts dist_timeout_s on a tiny file)."""
import os
import sys
import time

from dpo_ds.data.tokenize import ChunkTokenizer
from dpo_ds.cli import entry

tokenize_chunk = ChunkTokenizer.__call__


def slow_chunk(self, chunk):
    time.sleep(float(os.environ["SLOW_PREPARE_S"]))
    return tokenize_chunk(self, chunk)


ChunkTokenizer.__call__ = slow_chunk  # tokenizer processes are forked: they inherit the patch
sys.argv = ["dpo-ds", *sys.argv[1:]]
entry()
