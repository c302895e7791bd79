"""Training data: rows -> validated examples -> token ids, prepared once into a memory-mapped cache -> sampler ->
micro-batches.

- `rows`: a data file's rows (JSONL, Parquet, `datasets` directories) and the validated preference pair;
- `tokenize`: token ids as TRL computes them, in worker processes (`prompt_reuse`: each prompt encoded once
  where that is exact);
- `examples`: the example unit (`TokenizedExamples`: `TokenizedPairs`, `TokenizedUnpaired` for KTO) as ragged
  token columns, and `for_unit`: the examples a loss trains on;
- `store`: the prepared cache every rank memory-maps (`load_pairs`, `prepare_pairs`);
- `report`: length percentiles, the preparation summary and its warnings;
- `sampler`: which examples each rank uses at each optimizer step;
- `collate`: a micro-batch's tensors.
"""
from dpo_ds.data.collate import MicroBatch, collate
from dpo_ds.data.examples import (RowLocations, TokenColumn, TokenizedExamples, TokenizedPairs, TokenizedUnpaired,
                                  for_unit)
from dpo_ds.data.report import format_report
from dpo_ds.data.rows import DataError, PreferenceRow, validate_row
from dpo_ds.data.sampler import PairSampler, rank_shares
from dpo_ds.data.store import cache_path, cache_problem, data_fingerprint, load_pairs, prepare_pairs, tokenize_file
from dpo_ds.data.tokenize import PairTokenizer

__all__ = ["DataError", "MicroBatch", "PairSampler", "PairTokenizer", "PreferenceRow", "RowLocations", "TokenColumn",
           "TokenizedExamples", "TokenizedPairs", "TokenizedUnpaired", "cache_path", "cache_problem", "collate",
           "data_fingerprint", "for_unit", "format_report", "load_pairs", "prepare_pairs", "rank_shares", "tokenize_file", "validate_row"]
