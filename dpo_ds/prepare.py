"""`dpo-ds prepare`: tokenize a config's train_file and eval_file into cache_dir, as `train` would.

Runs without a process group (a CPU node is enough: slurm/prepare.sbatch CONFIG.yaml), in parallel over the
node's cores (`prepare_workers`), and writes the same cache `train` and `eval` look for (same fingerprint:
file contents, tokenizer, max_length, max_prompt_length, skip_bad_rows), so training then starts without
tokenizing. Prints, per file: pairs kept / dropped / cut, bad rows skipped, pairs skipped for identical
chosen/rejected ids, token totals, length percentiles and the time taken; `--show N` prints N pairs as the model
will see them. With a byte-level BPE tokenizer
(GPT-2's, Llama-3's or Qwen2's regex split) each prompt is encoded once, with the same ids as encoding
prompt + completion whole (the log says which path ran).

    dpo-ds prepare --config run.yaml [--field value ...]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dpo_ds.config import TrainConfig, add_config_arguments, config_from_args
from dpo_ds.console import emit, setup_logging
from dpo_ds.data import TokenizedExamples, TokenizedPairs, for_unit, format_report, load_pairs
from dpo_ds.losses import kto_weight_advice, loss_unit
from dpo_ds.parallel import Parallel

HELP = __doc__
logger = logging.getLogger("dpo_ds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="Print the first N training pairs as the model will see them: prompt and completions "
                             "decoded separately (the completion boundary), special tokens and whitespace visible.")
    add_config_arguments(parser)


def show_pairs(pairs: TokenizedPairs, tokenizer, n: int) -> str:
    """The first `n` pairs decoded as the model sees them, one labelled line per part, quoted so that special
    tokens and whitespace (a template's newline, a doubled end token) are visible."""
    lines = []
    for i in range(min(n, len(pairs))):
        parts = {name: pairs.column(name)[i].tolist() for name in pairs.COLUMNS if name != "label"}
        sizes = " + ".join(f"{len(ids)} {name}" for name, ids in parts.items())
        label = "" if pairs.KIND == "pair" else f", {'desirable' if pairs.labels[i] else 'undesirable'}"
        lines.append(f"{pairs.NOUN} {i + 1} of {len(pairs)} ({pairs.pair_ids[i]}{label}): {sizes} tokens")
        width = max(9, 1 + max(map(len, parts)))
        lines += [f"  {name:<{width}}{tokenizer.decode(ids, skip_special_tokens=False)!r}" for name, ids in parts.items()]
    return "\n".join(lines)


def cache_dir_of(cfg: TrainConfig) -> str:
    return cfg.cache_dir or str(Path(cfg.output_dir) / "caches")


def load_config_data(cfg: TrainConfig, tokenizer, parallel: Parallel = Parallel()
                     ) -> tuple[TokenizedPairs, str, TokenizedPairs | None]:
    """(train pairs, train data fingerprint, eval pairs or None) of a config, prepared into its cache_dir when
    missing: the one place `train` and `prepare` get their data, so both use the same cache."""
    args = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, skip_bad_rows=cfg.skip_bad_rows,
                cache_dir=cache_dir_of(cfg), parallel=parallel, workers=cfg.prepare_workers)
    train_pairs, fingerprint = load_pairs(cfg.train_file, tokenizer, **args)
    eval_pairs = load_pairs(cfg.eval_file, tokenizer, **args)[0] if cfg.eval_file else None
    return train_pairs, fingerprint, eval_pairs


def load_config_examples(cfg: TrainConfig, tokenizer, parallel: Parallel = Parallel()
                         ) -> tuple[TokenizedExamples, str, TokenizedExamples | None]:
    """`load_config_data` as the examples the loss trains on (data.for_unit: pairs split into unpaired examples
    for KTO): what `train` scores."""
    train, fingerprint, held_out = load_config_data(cfg, tokenizer, parallel)
    unit = loss_unit(cfg.loss_type)
    train = for_unit(train, unit, cfg.train_file, cfg.loss_type)
    if unit == "unpaired" and parallel.is_main:
        desirable = int(train.labels.sum())
        advice = kto_weight_advice(desirable, len(train) - desirable, cfg.desirable_weight, cfg.undesirable_weight)
        if advice:
            logger.warning("%s: %s", cfg.train_file, advice)
    return (train, fingerprint,
            None if held_out is None else for_unit(held_out, unit, cfg.eval_file, cfg.loss_type))


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer  # heavy: kept out of `dpo-ds prepare --help`

    setup_logging(0)
    started = time.perf_counter()
    cfg = config_from_args(args)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    train_pairs, _, eval_pairs = load_config_data(cfg, tokenizer)
    for path, pairs in ((cfg.train_file, train_pairs), (cfg.eval_file, eval_pairs)):
        if pairs is not None:
            print(f"{format_report(pairs, path)}\n  cache: {pairs.cache_path}", file=sys.stderr)
    if args.show:
        emit(show_pairs(train_pairs, tokenizer, args.show))
    print(f"dpo-ds prepare: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0
