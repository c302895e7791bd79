"""What preparation tells the user: length percentiles before truncation, the summary `dpo-ds prepare` prints,
and the warnings of a prepared file (skipped rows, truncation, identical completions, prompt boundaries)."""
from __future__ import annotations

import logging

import numpy as np

from dpo_ds.data.examples import TokenizedPairs

logger = logging.getLogger("dpo_ds")

SMALL_SHARE = 0.01        # truncation touching more pairs than this share gets a full report


def length_report(raw_lengths: np.ndarray, max_length: int, max_prompt_length: int | None) -> dict:
    """Percentiles of the untruncated lengths, and the max_length / max_prompt_length keeping 99% of pairs whole."""
    prompt, chosen, rejected = (raw_lengths[:, k].astype(np.int64) for k in range(3))
    pair = prompt + np.maximum(chosen, rejected)

    def pct(values: np.ndarray) -> dict[str, int]:
        if not len(values):
            return {k: 0 for k in ("p50", "p90", "p99", "max")}
        q = np.quantile(values, [0.5, 0.9, 0.99], method="higher")
        return {"p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(values.max())}

    lengths = {"prompt": pct(prompt), "chosen": pct(chosen), "rejected": pct(rejected), "pair": pct(pair)}
    return {"pairs": len(pair), "lengths": lengths, "max_length": max_length, "max_prompt_length": max_prompt_length,
            "keep_99": {"max_length": lengths["pair"]["p99"], "max_prompt_length": lengths["prompt"]["p99"]}}


def format_report(pairs: "TokenizedPairs", path: str) -> str:
    """The human summary `dpo-ds prepare` prints: pairs kept / dropped / cut, tokens, length percentiles."""
    s, r = pairs.stats, pairs.report
    lines = [f"{path}: {s['rows']} rows -> {pairs.counted()} kept; {s['skipped_bad_rows']} bad rows skipped, "
             f"{pairs.counted(s['dropped_truncated'])} dropped (prompt fills max_length), {s['truncated']} cut to fit"
             + (f", {s['identical_completions']} skipped for identical chosen/rejected ids" if pairs.KIND == "pair"
                else ""),
             f"  tokens stored: {' + '.join(f'{len(pairs.column(c).flat)} {c}' for c in pairs.COLUMNS)} = "
             f"{pairs.stored_tokens}"]
    if r:
        lines.append(_percentile_table(r))
    return "\n".join(lines)


def _percentile_table(report: dict) -> str:
    rows = [f"  {'tokens before truncation':<34}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"]
    names = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "pair": "prompt + longer completion"}
    for key, name in names.items():
        v = report["lengths"][key]
        rows.append(f"  {name:<34}{v['p50']:>8}{v['p90']:>8}{v['p99']:>8}{v['max']:>8}")
    keep = report["keep_99"]
    rows.append(f"  max_length {keep['max_length']} with max_prompt_length {keep['max_prompt_length']} would keep 99% "
                f"of the pairs whole (now max_length {report['max_length']}, max_prompt_length "
                f"{report['max_prompt_length']})")
    return "\n".join(rows)


def warn_about(pairs: "TokenizedPairs", path: str) -> None:
    """The warnings of a prepared file: skipped rows, truncation (with percentiles when it is not rare),
    identical completions, prompts that are not token prefixes."""
    s = pairs.stats
    if s["prompt_not_prefix"]:
        logger.warning("%s: in %d pairs the prompt's token ids are not a prefix of prompt+completion's "
                       "(the tokenizer merges across the boundary); the completion is the tail after "
                       "len(ids(prompt)), as in TRL", path, s["prompt_not_prefix"])
    if s["skipped_bad_rows"]:
        logger.warning("%s: skipped %d bad rows (skip_bad_rows)", path, s["skipped_bad_rows"])
    if s["identical_completions"]:
        logger.warning("%s: skipped %d pairs whose chosen and rejected completions are the same token ids (no "
                       "preference signal)%s", path, s["identical_completions"],
                       f"; {s['identical_after_truncation']} of them differ only beyond max_length"
                       if s["identical_after_truncation"] else "")
    tokenized = pairs.report.get("pairs", 0)
    touched = s["dropped_truncated"] + s["truncated"]
    if tokenized and touched > SMALL_SHARE * tokenized:
        logger.warning("%s: truncation dropped %d and cut %d of %d pairs (%.0f%%)\n%s", path, s["dropped_truncated"],
                       s["truncated"], tokenized, 100 * touched / tokenized, _percentile_table(pairs.report))
    elif s["dropped_truncated"]:
        logger.warning("%s: dropped %d pairs whose prompt leaves no completion token within max_length",
                       path, s["dropped_truncated"])

