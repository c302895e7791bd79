"""Exact TRL token ids with each prompt encoded once.

The TRL recipe needs ids(prompt), ids(prompt + chosen) and ids(prompt + rejected) of whole strings, so a plain
implementation encodes every prompt three times. For tokenizers whose pre-tokenizer is a regex split (GPT-2's
byte-level pattern, Llama-3's or Qwen2's) followed by BPE, no token crosses a pre-token boundary, and some
boundaries are decided by the characters right around them alone. At such a cut c inside the prompt:

    ids(prompt + x) = ids(prompt[:c]) + ids(prompt[c:] + x, no special tokens)   for every x (x = "" too)

so the prompt's head is encoded once and only its last few words are encoded again with each completion.

The cut used: prompt[c-1] and prompt[c+1] are ASCII letters and prompt[c] a space, at least MARGIN characters
before the prompt's end. In all three patterns, the pre-token holding the letter at c-1 is a letter run (with
an optional leading space or punctuation, or a contraction) that no alternative can extend over the space at
c, and every match before it is decided by characters before c + 1; the tail's scan starts at c exactly as
the whole string's does. Added tokens (matched before pre-tokenization, some eating neighbouring whitespace)
must not occur near the cut; an NFC normalizer never composes across an ASCII space. Tokenizers outside this
(sentencepiece/Metaspace, a prefix space, other normalizers, BPE dropout, post-processors that append
tokens) and prompts without such a cut are encoded whole.
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Sequence

MARGIN = 32  # characters the cut keeps from the prompt's end (the words re-encoded with each completion)
SEARCH = 512  # characters before that searched for a cut; a prompt without one there is encoded whole

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_PATTERNS = {  # Split pre-tokenizer patterns the cut rule was checked against (alternative by alternative)
    GPT2_PATTERN: "GPT-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "Llama-3",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "Qwen2",
}
ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
PROBES = ("Hello world", " two  spaces\n", "a", "", "x's y'll 12345 ?!")


def _is_byte_level(pre: dict, use_regex: bool) -> bool:
    return pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True) == use_regex


def _split_name(pre: dict | None) -> str | None:
    """Name of the supported regex pre-tokenization `pre` does, or None."""
    if pre is None:
        return None
    if _is_byte_level(pre, use_regex=True):
        return "GPT-2 byte-level"
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
            and _is_byte_level(byte_level, use_regex=False)):
        return SPLIT_PATTERNS.get((split.get("pattern") or {}).get("Regex"))
    return None


class PromptReuse:
    """Encodes (prompt, prompt + chosen, prompt + rejected) with each prompt's head encoded once (see module doc).

    Build with `for_tokenizer`, which returns None (and why) when the tokenizer is not one the cut is exact for."""

    def __init__(self, backend, added_tokens: Sequence[str], nfc: bool, description: str):
        self.backend = backend
        self.nfc = nfc
        self.description = description
        self.reach = max((len(t) for t in added_tokens), default=0) + 1  # window around the cut kept free of them
        self.added = re.compile("|".join(re.escape(t) for t in sorted(added_tokens, key=len, reverse=True))) \
            if added_tokens else None
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # ids only, no offsets

    @classmethod
    def for_tokenizer(cls, tok) -> tuple["PromptReuse | None", str]:
        """(PromptReuse, what it relies on) for an eligible tokenizer, else (None, why it is encoded whole)."""
        from tokenizers import Tokenizer

        source = getattr(tok, "backend_tokenizer", None)
        if source is None:
            return None, "not a fast (tokenizers) tokenizer"
        spec = json.loads(source.to_str())
        normalizer, model = spec.get("normalizer"), spec.get("model") or {}
        if normalizer is not None and normalizer.get("type") != "NFC":
            return None, f"normalizer {normalizer.get('type')} may look across the cut"
        split = _split_name(spec.get("pre_tokenizer"))
        if split is None:
            return None, f"pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]} is not a supported regex split"
        if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
            return None, f"model {model.get('type')} (dropout {model.get('dropout')}) is not a deterministic BPE"
        backend = Tokenizer.from_str(source.to_str())  # own copy: no truncation or padding, as tok() encodes
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(tok, "split_special_tokens", False))
        added = [t.content for t in tok.added_tokens_decoder.values() if t.content]
        reuse = cls(backend, added, nfc=normalizer is not None, description=f"{split} pre-tokens, BPE")
        if not reuse._agrees_with(tok):
            return None, "the backend's ids differ from the tokenizer's on probe strings (special tokens appended?)"
        return reuse, reuse.description

    def _agrees_with(self, tok) -> bool:
        """The post-processor only prepends a fixed prefix, and the backend gives tok()'s ids, on probes."""
        ids = {special: [e.ids for e in self.backend.encode_batch(list(PROBES), add_special_tokens=special)]
               for special in (True, False)}
        if any(ids[special] != tok(list(PROBES), add_special_tokens=special)["input_ids"] for special in ids):
            return False
        plain, with_special = ids[False], ids[True]
        prefix = with_special[0][:len(with_special[0]) - len(plain[0])]
        return all(w == prefix + p for w, p in zip(with_special, plain))

    def cut(self, prompt: str) -> int:
        """A character position where prompt's pre-tokens split whatever follows the prompt; 0 when none."""
        hi = len(prompt) - MARGIN
        lo = max(1, hi - SEARCH)
        while hi > lo:
            c = prompt.rfind(" ", lo, hi)
            if c < 1:
                return 0
            hi = c
            if prompt[c - 1] in ASCII_LETTERS and prompt[c + 1] in ASCII_LETTERS and self._no_added_near(prompt, c):
                return c
        return 0

    def _no_added_near(self, prompt: str, c: int) -> bool:
        if self.added is None:
            return True
        window = prompt[max(0, c - self.reach):c + self.reach + 1]
        return not (self.added.search(window) or (self.nfc and self.added.search(unicodedata.normalize("NFC", window))))

    def encode(self, texts: Sequence[tuple[str, str, str]], add_special_tokens: bool) -> tuple[list[list[list[int]]], int]:
        """([ids(p), ids(p + c), ids(p + r)] of each (p, c, r), equal to encoding the three strings whole; how many
        prompts had a cut, so that their heads were encoded once)."""
        cuts = [self.cut(p) for p, _, _ in texts]
        heads = [p[:cut] for (p, _, _), cut in zip(texts, cuts) if cut]
        whole = [s for (p, c, r), cut in zip(texts, cuts) if not cut for s in (p, p + c, p + r)]
        tails = [s for (p, c, r), cut in zip(texts, cuts) if cut for s in (p[cut:], p[cut:] + c, p[cut:] + r)]
        first = self._encode(heads + whole, add_special_tokens=add_special_tokens)
        rest = iter(self._encode(tails, add_special_tokens=False))
        head_ids, whole_ids = iter(first[:len(heads)]), iter(first[len(heads):])
        out = []
        for cut in cuts:
            if cut:
                head = next(head_ids).ids
                out.append([head + next(rest).ids for _ in range(3)])
            else:
                out.append([next(whole_ids).ids for _ in range(3)])
        return out, len(heads)
