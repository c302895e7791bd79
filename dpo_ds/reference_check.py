"""Consistent tokenization between the policy and a reference model loaded from another directory.

DPO compares log pi(y|x) with log pi_ref(y|x) token by token, with ONE tokenization of the batch (the
policy's). A reference whose tokenizer maps ids to different strings, has other special tokens or another
chat template, or whose embedding table has a different number of rows, would score a different text
(or index out of range) and silently corrupt every reward. `check_reference_compatible` refuses such a
pair before any engine is built, naming the first difference it finds.

Only tokenizers and configs are loaded (`AutoTokenizer`, `families.load_model_config`), never weights: the embedding size
is taken from the config's `vocab_size`, which is the row count of `get_input_embeddings()` for a model
that was saved consistently. Hidden sizes may differ; only the vocabulary has to match.
"""
from __future__ import annotations

import os
from typing import Any

from dpo_ds.config import ConfigError
from dpo_ds.families import load_model_config

# Texts whose encodings must agree: catches tokenizers with equal vocabularies that still split text
# differently (merges, normalizer, pre-tokenizer, automatic BOS/EOS).
PROBE_TEXTS = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Question: Which one? Answer: How about apple?",
    "Numbers 0 12 345 6789 3.14159 and symbols #$%&*()[]{}<>",
    "Unicode: café naïve 日本語 中文 한국어 emoji 🙂",
    "CamelCaseWords snake_case_words kebab-case-words",
)
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_EXCERPT = 24


class ReferenceMismatch(ConfigError):
    """The reference model cannot be scored with the policy's tokenization. A `ConfigError` (and so a
    `ValueError`): the trainer reports it like any other configuration problem, before training."""


def check_reference_compatible(policy_path: str, ref_path: str, trust_remote_code: bool = False) -> None:
    """Raise ReferenceMismatch naming the first difference between the policy's and the reference's
    tokenizer (vocabulary, special tokens, chat template, encodings) or config vocab_size."""
    if _same_location(policy_path, ref_path):
        return
    policy_tok = _load("tokenizer", policy_path, trust_remote_code)
    ref_tok = _load("tokenizer", ref_path, trust_remote_code)
    problem = (_vocab_difference(policy_tok, ref_tok, policy_path, ref_path)
               or _special_token_difference(policy_tok, ref_tok)
               or _chat_template_difference(policy_tok, ref_tok)
               or _encoding_difference(policy_tok, ref_tok))
    if problem:
        raise ReferenceMismatch(
            f"reference tokenizer differs from the policy's ({policy_path} vs {ref_path}): {problem}. "
            "DPO scores both models on the policy's token ids; use a reference with the policy's tokenizer "
            "(or leave ref_model_name_or_path unset to use the policy's starting weights)")
    policy_vocab = _config_vocab_size(_load("config", policy_path, trust_remote_code))
    ref_vocab = _config_vocab_size(_load("config", ref_path, trust_remote_code))
    if policy_vocab is not None and ref_vocab is not None and policy_vocab != ref_vocab:
        raise ReferenceMismatch(
            f"reference embedding size differs from the policy's ({policy_path} vs {ref_path}): vocab_size "
            f"{policy_vocab} (policy config) vs {ref_vocab} (reference config); both models must have one "
            "embedding row per token id of the shared tokenizer")


# ------------------------------------------------------------------------------------------ loading
def _same_location(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _load(kind: str, path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    loader = AutoTokenizer.from_pretrained if kind == "tokenizer" else load_model_config
    try:
        return loader(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - re-raised with the path and what was being loaded
        raise ReferenceMismatch(f"cannot load the {kind} of {path} to check reference compatibility: "
                                f"{type(err).__name__}: {err}") from err


def _config_vocab_size(config: Any) -> int | None:
    size = getattr(config, "vocab_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    return size


# ------------------------------------------------------------------------------------------ comparisons
def _vocab_difference(policy_tok, ref_tok, policy_path: str, ref_path: str) -> str | None:
    """The lowest token id at which the two vocabularies (added tokens included) disagree."""
    p_vocab, r_vocab = policy_tok.get_vocab(), ref_tok.get_vocab()
    if p_vocab == r_vocab:
        return None
    p_by_id = {i: t for t, i in p_vocab.items()}
    r_by_id = {i: t for t, i in r_vocab.items()}
    for token_id in sorted(set(p_by_id) | set(r_by_id)):
        p_tok, r_tok = p_by_id.get(token_id), r_by_id.get(token_id)
        if p_tok == r_tok:
            continue
        if p_tok is not None and r_tok is not None:
            return f"id {token_id} is {p_tok!r} in the policy's tokenizer, {r_tok!r} in the reference's"
        if p_tok is not None:
            if p_tok in r_vocab:
                return f"token {p_tok!r} has id {token_id} in {policy_path} but id {r_vocab[p_tok]} in {ref_path}"
            return f"token {p_tok!r} has id {token_id} in {policy_path} but is missing in {ref_path}"
        if r_tok in p_vocab:
            return f"token {r_tok!r} has id {token_id} in {ref_path} but id {p_vocab[r_tok]} in {policy_path}"
        return f"token {r_tok!r} has id {token_id} in {ref_path} but is missing in {policy_path}"
    # Same id -> token maps can only differ as dicts through duplicate ids (two strings, one id).
    for token, token_id in sorted(p_vocab.items(), key=lambda kv: (kv[1], kv[0])):
        if r_vocab.get(token) != token_id:
            return f"token {token!r} has id {token_id} in {policy_path} but {r_vocab.get(token)} in {ref_path}"
    for token, token_id in sorted(r_vocab.items(), key=lambda kv: (kv[1], kv[0])):
        if p_vocab.get(token) != token_id:
            return f"token {token!r} has id {token_id} in {ref_path} but {p_vocab.get(token)} in {policy_path}"
    return None


def _special_token_difference(policy_tok, ref_tok) -> str | None:
    for attr in _SPECIAL_ATTRIBUTES:
        p, r = _token_str(getattr(policy_tok, attr, None)), _token_str(getattr(ref_tok, attr, None))
        if p != r:
            return f"{attr}: {p!r} (policy) vs {r!r} (reference)"
        p_id, r_id = getattr(policy_tok, f"{attr}_id", None), getattr(ref_tok, f"{attr}_id", None)
        if p_id != r_id:
            return f"{attr} {p!r} has id {p_id} in the policy's tokenizer, {r_id} in the reference's"
    p_all, r_all = _special_set(policy_tok), _special_set(ref_tok)
    if p_all != r_all:
        only_p, only_r = sorted(p_all - r_all), sorted(r_all - p_all)
        if only_p:
            return f"special token {only_p[0]!r} of the policy's tokenizer is not special in the reference's"
        return f"special token {only_r[0]!r} of the reference's tokenizer is not special in the policy's"
    return None


def _token_str(token: Any) -> str | None:
    return None if token is None else str(token)


def _special_set(tok) -> set[str]:
    return {str(t) for t in getattr(tok, "all_special_tokens", ())}


def _templates(tok) -> dict[str, str]:
    template = getattr(tok, "chat_template", None)
    if template is None:
        return {}
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, dict):
        return {str(k): str(v) for k, v in template.items()}
    return {str(t.get("name", i)): str(t.get("template", "")) for i, t in enumerate(template)}


def _chat_template_difference(policy_tok, ref_tok) -> str | None:
    p, r = _templates(policy_tok), _templates(ref_tok)
    for name in sorted(set(p) | set(r)):
        label = "chat_template" if name == "default" else f"chat_template {name!r}"
        if name not in r:
            return f"{label} is set in the policy's tokenizer but missing in the reference's"
        if name not in p:
            return f"{label} is set in the reference's tokenizer but missing in the policy's"
        if p[name] != r[name]:
            at = len(os.path.commonprefix([p[name], r[name]]))
            return (f"{label} differs (first difference at character {at}: policy "
                    f"{p[name][at:at + _EXCERPT]!r} vs reference {r[name][at:at + _EXCERPT]!r})")
    return None


def _encoding_difference(policy_tok, ref_tok) -> str | None:
    specials = [t for t in (policy_tok.bos_token, policy_tok.eos_token) if t is not None]
    texts = list(PROBE_TEXTS) + ["".join(str(t) for t in specials) + " text between special tokens"]
    for text in texts:
        p_ids = list(policy_tok(text)["input_ids"])
        r_ids = list(ref_tok(text)["input_ids"])
        if p_ids != r_ids:
            at = next((i for i, (a, b) in enumerate(zip(p_ids, r_ids)) if a != b), min(len(p_ids), len(r_ids)))
            p_here = p_ids[at] if at < len(p_ids) else "end"
            r_here = r_ids[at] if at < len(r_ids) else "end"
            return (f"encoding {text!r} differs at token {at}: {p_here} (policy) vs {r_here} (reference) "
                    f"[{len(p_ids)} vs {len(r_ids)} tokens]")
    return None
