"""`dpo-ds eval`: preference accuracy and mean reward margin of a model on held-out pairs.

The implicit reward is r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)); a pair counts as correct when
r(chosen) > r(rejected). A model inside a run folder (<run>/final, a converted checkpoint next to the run's
run_config.json) is scored as the run trained it: against the run's reference model, with its loss settings,
unless flags say otherwise. With `--ref_model none` (the default for a model outside a run), log pi_ref is 0 and
the comparison is the model's own likelihood of chosen versus rejected. Runs single-process or under any launcher
(ZeRO-3 inference engines, so models larger than one device work too); with --sequence_parallel_size S, S ranks
share every sequence as in `train` (pairs too long for one device). Writes one JSON line per pair (log-probs,
rewards, margin, correct) to a new file and prints a JSON summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import get_args

from dpo_ds import sequence_parallel
from dpo_ds.config import AttnImplementation, ConfigError, TrainConfig, config_from_args
from dpo_ds.console import emit, setup_logging
from dpo_ds.data import for_unit, load_pairs
from dpo_ds.families import load_model_config
from dpo_ds.losses import OBJECTIVE_FIELDS, loss_unit, needs_reference
from dpo_ds.parallel import Parallel

HELP = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory to score.")
    parser.add_argument("--ref_model", help="Reference model directory, or `none` (log pi_ref = 0). Default: the reference "
                                            "of the run --model belongs to (its ref_model_name_or_path, else its "
                                            "starting model; none for a reference-free loss), else none.")
    parser.add_argument("--data", required=True, help="Preference pairs (JSONL, Parquet or save_to_disk dir).")
    parser.add_argument("--output", help="Per-pair JSONL to write (default: a new eval_pairs_<data file name>[-N].jsonl "
                                         "in the run folder of --model, else in the current directory). An existing "
                                         "file is refused unless --overwrite.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    parser.add_argument("--beta", type=float, help="beta of the implicit reward (default: the training run's when --model "
                                                   "is inside a run folder, else 0.1); the loss settings come from the "
                                                   "run too.")
    parser.add_argument("--max_length", type=int, default=1024, help="Maximum tokens of prompt + completion.")
    parser.add_argument("--max_prompt_length", type=int, help="Keep only the last N prompt tokens.")
    parser.add_argument("--micro_batch_size", type=int, default=8, help="Pairs per forward of each data-parallel "
                                                                       "rank (of each group of S ranks under "
                                                                       "--sequence_parallel_size S).")
    parser.add_argument("--sequence_parallel_size", type=int, metavar="S", help="S ranks share every sequence (DeepSpeed's Ulysses, "
                        "as `train`'s field of this name): each group of S consecutive ranks scores its share of the "
                        "pairs, each rank 1/S of every sequence. S must divide the number of ranks and the model's "
                        "attention heads. Default 1.")
    parser.add_argument("--attn_implementation", choices=get_args(AttnImplementation),
                        help="Attention kernel, as `train`'s field of this name (default auto).")
    parser.add_argument("--precompute_ref", action="store_true", default=None,
                        help="Score the reference over all pairs first (as `train`'s precompute_ref: cached in "
                             "--cache_dir, reused when present), then build the scored model: the two models are "
                             "never in memory together.")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="Default: as `train`'s precision auto (bf16 on a "
                                                                      "CUDA GPU that supports it, else fp32).")
    parser.add_argument("--skip_bad_rows", action="store_true", help="Skip and count invalid rows.")
    parser.add_argument("--cache_dir", help="Where the prepared (tokenized) pairs are cached, shared with `train` and "
                        "`prepare` (same settings, same cache). Default: the run's cache when --model is inside a "
                        "run folder (a run_config.json above it), else $XDG_CACHE_HOME/dpo-ds (~/.cache/dpo-ds).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow code shipped with the model to run.")


def trained_by(model: str) -> tuple[Path, dict] | None:
    """(run folder, its run_config.json) of the run `model` belongs to (<run>/final, <run>/checkpoints/...)."""
    for folder in list(Path(model).resolve().parents)[:3]:
        if (folder / "run_config.json").is_file():
            return folder, json.loads((folder / "run_config.json").read_text())
    return None


def default_cache_dir(model: str) -> str:
    """The cache of the run `model` belongs to, else the user's cache."""
    run = trained_by(model)
    if run is not None:
        return run[1].get("cache_dir") or str(run[0] / "caches")
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpo-ds")


def reference_model(args: argparse.Namespace, trained: tuple[Path, dict] | None) -> str | None:
    """The reference --model is scored against: --ref_model (`none`: no reference), else the reference of the run
    it belongs to (that run's ref_model_name_or_path, else its starting model; none for a reference-free loss)."""
    if args.ref_model is not None:
        return None if args.ref_model.lower() == "none" else args.ref_model
    if trained is None:
        return None
    folder, run = trained
    if run.get("reference_free") or not needs_reference(run.get("loss_type", "sigmoid")):
        return None
    path = run.get("ref_model_name_or_path") or run.get("model_name_or_path")
    if path is None or not Path(path).exists():
        raise ConfigError(f"{folder / 'run_config.json'}: the run's reference model {path!r} is not here; pass "
                          f"--ref_model DIR (or --ref_model none to score without a reference)", "ref_model")
    return path


def eval_config(args: argparse.Namespace) -> TrainConfig:
    """The run configuration of `dpo-ds eval`, built as every command builds it (config.config_from_args): the
    loss settings of the run that trained --model, then the flags named like config fields (--beta,
    --max_length, --precision, ...), then what --model, --ref_model and --data say."""
    trained = trained_by(args.model)
    # the loss settings of the run that trained the model it scores
    loss_settings = {name: trained[1][name] for name in OBJECTIVE_FIELDS if name in trained[1]} if trained else {}
    reference = reference_model(args, trained)
    return config_from_args(args, defaults=loss_settings,
                            fixed={"model_name_or_path": args.model, "ref_model_name_or_path": reference,
                                   "train_file": args.data, "reference_free": reference is None})


def output_path(args: argparse.Namespace) -> Path:
    """Where the per-pair records go: --output (an existing file only with --overwrite), else a new file named
    after the data in the run folder of --model, or in the current directory."""
    if args.output:
        output = Path(args.output)
        if output.exists() and not args.overwrite:
            raise ConfigError(f"--output {output}: the file exists; pass --overwrite to replace it", "output")
        return output
    trained = trained_by(args.model)
    folder = trained[0] if trained else Path.cwd()
    stem = f"eval_pairs_{Path(args.data).stem}"
    candidates = (folder / (f"{stem}.jsonl" if n == 1 else f"{stem}-{n}.jsonl") for n in itertools.count(1))
    return next(path for path in candidates if not path.exists())


def scored_model_config(cfg: TrainConfig, hidden: int) -> dict:
    """The scored model's DeepSpeed config: the reference's ZeRO-3 inference preset with its parameters kept on
    the device. ref_offload is the reference's setting; offloading the scored model would stream every weight
    over PCIe at each forward on a GPU."""
    from dpo_ds.engines import resolve_reference_config

    return resolve_reference_config(dataclasses.replace(cfg, ref_offload=False), hidden)


def run(args: argparse.Namespace) -> int:
    # heavy (transformers, DeepSpeed): imported when the command runs, so `dpo-ds eval --help` stays fast
    from transformers import AutoTokenizer

    from dpo_ds.engines import attention_kernel, build_inference_engine, model_dtype, resolve_padding_free
    from dpo_ds.reference import build_reference
    from dpo_ds.step import StepContext, evaluate_pairs, pad_id_of

    cfg = eval_config(args)
    output = output_path(args)  # refused before anything loads when it would overwrite
    parallel = Parallel.init(timeout_s=cfg.dist_timeout_s, sequence_parallel_size=cfg.sequence_parallel_size)
    setup_logging(parallel.rank)
    resolve_padding_free(cfg)  # before the refusals below, which check the attention kernel it decides
    if cfg.sequence_parallel_size > 1:  # train's refusals, before anything loads
        sequence_parallel.check_models(cfg, parallel.world_size)
    cache_dir = args.cache_dir or default_cache_dir(args.model)
    parallel.check_shared_dirs({"cache_dir": cache_dir})
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    pairs, _ = load_pairs(args.data, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                          skip_bad_rows=cfg.skip_bad_rows, cache_dir=cache_dir, parallel=parallel)
    pairs = for_unit(pairs, loss_unit(cfg.loss_type), args.data, cfg.loss_type)
    hidden = load_model_config(args.model, args.trust_remote_code).hidden_size
    pad_id, kernel = pad_id_of(tokenizer), attention_kernel(cfg)
    mpu = sequence_parallel.attention_for_run(cfg, parallel, kernel)  # the groups and the Ulysses attention (S > 1)
    # as `train` builds them: the reference first (with precompute_ref its engine is gone before the scored model
    # exists), both scored through the same BatchScorer (step.pair_step, reference.LiveReference)
    reference = build_reference(cfg, hidden, parallel, [pairs], cache_dir, pad_id, mpu=mpu)
    model = build_inference_engine(args.model, scored_model_config(cfg, hidden), model_dtype(cfg),
                                   args.trust_remote_code, attn_implementation=kernel, cfg=cfg, mpu=mpu)
    # every data-parallel group scores its share; records and metrics hold each pair once (step.evaluate_pairs)
    metrics, records = evaluate_pairs(StepContext.create(cfg, parallel, model, reference, pad_id), pairs)
    if parallel.is_main:
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("w") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
        summary = {"model": args.model, "ref_model": cfg.ref_model_name_or_path, "data": args.data, "beta": cfg.beta,
                   "loss_type": cfg.loss_type, "pairs": len(records),
                   "accuracy": metrics["eval/rewards/accuracies"], "mean_margin": metrics["eval/rewards/margins"],
                   "loss": metrics["eval/loss"], "per_pair_file": str(output)}
        if "eval/kl" in metrics:  # KTO: unpaired examples; accuracy = on their label's side of the reference point
            summary.update(examples=summary.pop("pairs"), kl=metrics["eval/kl"],
                           desirable=sum(r["label"] for r in records))
        else:
            summary["ties"] = sum(r["margin"] == 0 for r in records)
        emit(json.dumps(summary))
    return 0
