"""Prompts encoded once (dpo_ds.data.prompt_reuse) give exactly the ids of encoding prompt, prompt + chosen and
prompt + rejected whole, on adversarial strings around the prompt/completion boundary; tokenizers the cut rule
does not hold for are recognised and encoded whole."""
from __future__ import annotations

import random

import pytest

from dpo_ds.data import PairTokenizer, PreferenceRow
from dpo_ds.data.prompt_reuse import MARGIN, PromptReuse
from helpers import regex_bpe_tokenizer

# Pieces that make pre-tokenization depend on context: whitespace runs and newlines (\s+(?!\S)), contractions,
# digit runs (Llama-3 groups 3), punctuation before letters, non-ASCII letters, combining marks (NFC), emoji,
# a no-break space, added tokens (one eating spaces on its left, one containing a space) and their halves.
TRICKY = [" ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "\t", "\r\n", " \r\n ", "'s", "'ll", "'S", "'", "1", "12",
          "1234567", ",", ".", "!?", "...", " -", "_", "é", "e\u0301", "\u0301", "ñ", "İ", "ǅ", "ß", "日本語", "👍",
          "👍🏽", "\u00a0", "²", "½", "<s>", "</s>", "<mask>", " <mask>", "ab cd", "ab", " cd", "<", "mask>", "$", "x"]


def random_text(rng: random.Random, words: int, tricky: float) -> str:
    out = []
    for _ in range(words):
        if rng.random() < tricky:
            out.append("".join(rng.choices(TRICKY, k=rng.randint(1, 3))))
        else:
            out.append("".join(rng.choices("abcdefghijklmnopqrstuvwxyzABC", k=rng.randint(1, 8))))
        out.append(rng.choice([" ", " ", " ", "", "  ", "\n"]))
    return "".join(out)


def adversarial_triples(n: int, seed: int) -> list[tuple[str, str, str]]:
    """Prompts of words with tricky pieces everywhere (so cuts land next to them) and tricky endings (spaces,
    newlines, half an added token); completions starting with tricky pieces, empty, or whitespace only."""
    rng = random.Random(seed)
    triples = []
    for _ in range(n):
        prompt = random_text(rng, rng.randint(0, 40), tricky=rng.choice([0.05, 0.3])) + "".join(
            rng.choices(TRICKY, k=rng.randint(0, 3)))
        completions = []
        for _ in range(2):
            roll = rng.random()
            completions.append("" if roll < 0.05 else rng.choice([" ", "\n", "  "]) if roll < 0.1 else
                               "".join(rng.choices(TRICKY, k=rng.randint(0, 3))) + random_text(rng, rng.randint(0, 8), 0.3))
        triples.append((prompt, *completions))
    return triples


CORPUS = [random_text(random.Random(i), 30, 0.3) for i in range(300)]


@pytest.fixture(scope="module", params=["gpt2", "llama3", "qwen2"])
def regex_tok(request):
    return regex_bpe_tokenizer(request.param, CORPUS)


def test_prompt_encoded_once_equals_whole_strings(regex_tok):
    reuse, path = PromptReuse.for_tokenizer(regex_tok)
    assert reuse is not None, path
    triples = adversarial_triples(2000, seed=1)
    for special in (True, False):
        got, reused = reuse.encode(triples, add_special_tokens=special)
        batch = [s for p, c, r in triples for s in (p, p + c, p + r)]
        ids = regex_tok(batch, add_special_tokens=special)["input_ids"]
        expected = [ids[k:k + 3] for k in range(0, len(ids), 3)]
        mismatched = [t for t, g, e in zip(triples, got, expected) if g != e]
        assert not mismatched, mismatched[:3]
        # the fast path is what ran for most rows, not the fallback
        assert reused > len(triples) // 2


def test_cut_rule(regex_tok):
    reuse, _ = PromptReuse.for_tokenizer(regex_tok)
    tail = "x" * MARGIN
    assert reuse.cut("hello world" + tail) == 5  # the last letter-space-letter at least MARGIN from the end
    assert reuse.cut("hello world " + tail) == 11
    assert reuse.cut("hello  world" + tail) == 0  # a space run: how it splits depends on the next character
    assert reuse.cut("hello ab cd world" + tail) == 0  # never next to an added token
    assert reuse.cut("hello\nworld" + tail) == 0 and reuse.cut("hé wörld" + tail) == 0  # ASCII letters only
    assert reuse.cut("short prompt") == 0


def test_pair_tokenizer_uses_it_and_keeps_the_recipe_ids(regex_tok):
    """PairTokenizer with and without the fast path: same (prompt, chosen, rejected, prompt-was-a-prefix)."""
    rows = [PreferenceRow(p, c, r) for p, c, r in adversarial_triples(400, seed=2) if c != r]
    fast = PairTokenizer(regex_tok, 4096)
    whole = PairTokenizer(regex_tok, 4096)
    whole.prompt_reuse = None
    fast_out, reused = fast.encode(rows)
    assert reused > len(rows) // 2
    assert fast_out == whole.encode(rows)[0]


@pytest.mark.parametrize("kind, why", [("prefix_space", "pre-tokenizer"), ("dropout", "dropout"),
                                       ("appends_eos", "probe")])
def test_other_tokenizers_are_encoded_whole(kind, why):
    reuse, reason = PromptReuse.for_tokenizer(regex_bpe_tokenizer(kind, CORPUS[:50], vocab_size=300))
    assert reuse is None and why in reason


def test_sentencepiece_tokenizer_is_encoded_whole(demo_assets, caplog, tmp_path):
    """The demo tokenizer (sentencepiece: Metaspace pre-tokens, prepend_scheme 'first') falls back, and the
    preparation log says which path ran."""
    import json
    import logging

    from transformers import AutoTokenizer

    from dpo_ds.data import tokenize_file

    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    pair_tokenizer = PairTokenizer(tok, 512)
    assert pair_tokenizer.prompt_reuse is None and "Metaspace" in pair_tokenizer.encoding_path
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "Question: what? Answer:", "chosen": " yes", "rejected": " no"}) + "\n")
    with caplog.at_level(logging.INFO, logger="dpo_ds"):
        tokenize_file(str(path), pair_tokenizer, False)
    assert any("prompts encoded whole with each completion (pre-tokenizer" in r.getMessage() for r in caplog.records)
