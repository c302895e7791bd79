"""Demo assets built from code alone: a preference dataset, a tokenizer trained on it and a tiny Llama.

The task is "name a member of the requested category". Every prompt asks for one of six categories
(fruit, animal, colour, tool, vehicle, sport), e.g.

    prompt:   "Question: Mia needs a tool for a story. Which one? Answer:"
    chosen:   " How about hammer?"
    rejected: " How about tennis?"

The rule (`is_preferred`): a response is preferred when every category member it names belongs to the
requested category, and it names at least one. Chosen and rejected share the prompt and the response
template and differ in one word, like real preference pairs; which word is right depends on the prompt,
so a model must read the prompt to learn it. Each item is as often chosen (for its own category) as
rejected (for the others), so an untrained model prefers chosen about half the time.

The held-out split is a fixed 25% of all distinct prompts (16 names x 6 phrasings x 6 categories: 432
train and 144 held-out prompts), so no held-out prompt occurs in training, whatever the seed.

Learnability, checked with plain single-process PyTorch DPO from the default (random) model: 2 layers,
hidden 128, 0.66M parameters; beta 0.5, AdamW lr 1e-3, batch 16, seeds 0-4. Held-out accuracy (policy
prefers chosen, by implicit reward and by raw likelihood alike) goes from ~50% to 88-100% at step 100 and
98-100% at step 200; with 10 warmup steps and gradient clipping at 1.0, 95-99% at step 100 and 99-100%
at step 200. Two choices make it that quick: six categories (eight left some seeds near 93% at step 200)
and every word a single token (multi-token answers let likelihood lag far behind reward accuracy).

Everything is deterministic: the same arguments give byte-identical data, tokenizer and weights.
Run `python -m dpo_ds.demo_data OUT_DIR` to build the assets and print their paths.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass

# Category -> members. Every word is unique across categories and absent from the phrasings and names,
# so the category a response names is never ambiguous.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"),
    "animal": ("cat", "dog", "horse", "lion", "mouse", "rabbit", "tiger", "wolf"),
    "colour": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black"),
    "tool": ("hammer", "saw", "wrench", "drill", "shovel", "axe", "chisel", "pliers"),
    "vehicle": ("bus", "car", "truck", "train", "bicycle", "boat", "tram", "van"),
    "sport": ("tennis", "soccer", "golf", "hockey", "rugby", "baseball", "volleyball", "swimming"),
}
NAMES = ("Alice", "Bob", "Carol", "Dave", "Emma", "Frank", "Grace", "Henry",
         "Iris", "Jack", "Kate", "Leo", "Mia", "Noah", "Olivia", "Paul")
QUESTIONS = (
    "{name} asks: can you name {a_category}?",
    "{name} needs {a_category} for a story. Which one?",
    "{name} is thinking of {a_category}. Guess it.",
    "Please name {a_category} for {name}.",
    "{name} wants to learn about {a_category}. Pick one.",
    "What is {a_category} that {name} might like?",
)
# Responses start with a space: prompt + response is the whole text, tokenized in one piece.
ANSWERS = (" I would say {item}.", " How about {item}?", " My answer is {item}.", " Try {item}.", " One example is {item}.")

PROMPT_FORMAT = "Question: {question} Answer:"
# Renders conversations exactly like the plain prompts, so both data formats give the same token ids.
# The space after BOS is the word-start marker that plain encoding adds itself but that the tokenizer
# does not add to text following a special token (without it "Question" splits into other pieces).
CHAT_TEMPLATE = (
    "{{ bos_token + ' ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ ' Answer: ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' Answer:' }}{% endif %}"
)

HELDOUT_FRACTION = 0.25
N_HELDOUT_PROMPTS = round(len(QUESTIONS) * len(NAMES) * len(CATEGORIES) * HELDOUT_FRACTION)
SPLIT_SEED = "dpo-ds-demo-split"  # fixed, so train and held-out stay disjoint for every `seed`
VOCAB_SIZE = 512  # smallest power of two at which every word of the task is a single piece (tests check)

_ITEM_CATEGORY = {item: category for category, items in CATEGORIES.items() for item in items}
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class DemoAssets:
    model_dir: str      # HF model dir (config.json, model.safetensors, tokenizer files)
    train_file: str     # JSONL, one {"prompt","chosen","rejected"} object per line
    heldout_file: str   # JSONL, same format, prompts disjoint from train


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _all_prompts() -> list[tuple[str, str]]:
    """Every distinct (prompt, category), in a fixed order."""
    return [
        (PROMPT_FORMAT.format(question=q.format(name=name, a_category=_with_article(category))), category)
        for q in QUESTIONS for name in NAMES for category in CATEGORIES
    ]


def _split_prompts(split: str) -> list[tuple[str, str]]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    prompts = _all_prompts()
    random.Random(SPLIT_SEED).shuffle(prompts)
    return prompts[:N_HELDOUT_PROMPTS] if split == "heldout" else prompts[N_HELDOUT_PROMPTS:]


def make_pairs(n: int, seed: int, split: str) -> list[dict]:
    """`n` preference pairs {"prompt", "chosen", "rejected"} drawn from the prompts of `split`.

    Prompts are visited in a shuffled order without repeats until the split's pool is used up, then
    again in a fresh order.
    """
    pool = _split_prompts(split)
    rng = random.Random(f"{seed}-{split}")  # str seeds hash with SHA-512: stable across runs and platforms
    order: list[tuple[str, str]] = []
    pairs = []
    for _ in range(n):
        if not order:
            order = rng.sample(pool, len(pool))
        prompt, category = order.pop()
        wrong_category = rng.choice([c for c in CATEGORIES if c != category])
        answer = rng.choice(ANSWERS)
        pairs.append({
            "prompt": prompt,
            "chosen": answer.format(item=rng.choice(CATEGORIES[category])),
            "rejected": answer.format(item=rng.choice(CATEGORIES[wrong_category])),
        })
    return pairs


def requested_category(prompt: str) -> str:
    """The category a demo prompt asks for; ValueError when it does not ask for exactly one."""
    found = {word for word in _WORD.findall(prompt.lower()) if word in CATEGORIES}
    if len(found) != 1:
        raise ValueError(f"not a demo prompt (asks for {sorted(found) or 'no category'}): {prompt!r}")
    return found.pop()


def is_preferred(prompt: str, response: str) -> bool:
    """The rule: the response names at least one member of the requested category and no other item."""
    named = {_ITEM_CATEGORY[word] for word in _WORD.findall(response.lower()) if word in _ITEM_CATEGORY}
    return named == {requested_category(prompt)}


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _tokenizer_corpus() -> list[str]:
    """Every prompt and every response the task can produce: independent of n/seed, so is the tokenizer."""
    responses = [answer.format(item=item).strip() for answer in ANSWERS for item in _ITEM_CATEGORY]
    return [prompt for prompt, _ in _all_prompts()] + responses


def _build_tokenizer(model_dir: str):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    proto = io.BytesIO()
    # Single thread, no sampling/shuffling and an in-memory corpus (no file path recorded in the proto):
    # the model bytes depend on the corpus alone. Special ids follow Llama (unk 0, bos 1, eos 2), which
    # is what the transformers Llama converter assumes; pad gets its own id so it never masks EOS.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus()), model_writer=proto, model_type="bpe",
        vocab_size=VOCAB_SIZE, character_coverage=1.0, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        pad_piece="<pad>", minloglevel=2,
    )
    # transformers 5 only converts a sentencepiece model inside from_pretrained (the constructor ignores
    # vocab_file), and adds BOS only when add_bos_token is passed explicitly. Convert in a scratch dir:
    # in `model_dir`, a tokenizer.json from an earlier build would win over the new model.
    with tempfile.TemporaryDirectory() as scratch:
        with open(os.path.join(scratch, "tokenizer.model"), "wb") as fh:
            fh.write(proto.getvalue())
        tokenizer = LlamaTokenizer.from_pretrained(
            scratch, pad_token="<pad>", add_bos_token=True, add_eos_token=False, chat_template=CHAT_TEMPLATE,
        )
    tokenizer.save_pretrained(model_dir)
    return tokenizer


def _build_model(model_dir: str, vocab_size: int, hidden_size: int, num_layers: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, tie_word_embeddings=False, attention_dropout=0.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)


def build_demo_assets(out_dir: str, n_train: int = 3200, n_heldout: int = N_HELDOUT_PROMPTS, seed: int = 0,
                      hidden_size: int = 128, num_layers: int = 2) -> DemoAssets:
    """Write the demo model dir (tiny random Llama + tokenizer) and the train/held-out JSONL under `out_dir`.

    The defaults give 200 steps of batch 16 and every held-out prompt once.
    """
    model_dir = os.path.join(out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    assets = DemoAssets(model_dir=model_dir, train_file=os.path.join(out_dir, "train.jsonl"),
                        heldout_file=os.path.join(out_dir, "heldout.jsonl"))
    _write_jsonl(assets.train_file, make_pairs(n_train, seed, "train"))
    _write_jsonl(assets.heldout_file, make_pairs(n_heldout, seed, "heldout"))
    tokenizer = _build_tokenizer(model_dir)
    _build_model(model_dir, len(tokenizer), hidden_size, num_layers, seed)
    return assets


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dpo_ds.demo_data OUT_DIR")
    built = build_demo_assets(sys.argv[1])
    print(f"model_dir:    {built.model_dir}\ntrain_file:   {built.train_file}\nheldout_file: {built.heldout_file}")
