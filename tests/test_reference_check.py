"""`check_reference_compatible`: a reference from another directory must share the policy's tokenization
(vocabulary, special tokens, chat template, encodings) and embedding size; the first difference is named."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from dpo_ds.config import ConfigError
from dpo_ds.reference_check import ReferenceMismatch, check_reference_compatible


@pytest.fixture(scope="module")
def make_variant(demo_assets, tmp_path_factory):
    """copy of the demo model dir, changed by `edit(dir)`; returns the copy's path."""
    root = tmp_path_factory.mktemp("ref_variants")

    def make(name: str, edit=None) -> str:
        out = root / name
        shutil.copytree(demo_assets.model_dir, out)
        if edit is not None:
            edit(out)
        return str(out)

    return make


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def mismatch(policy: str, ref: str) -> str:
    with pytest.raises(ReferenceMismatch) as info:
        check_reference_compatible(policy, ref)
    return str(info.value)


# ---------------------------------------------------------------------------- compatible references
def test_identical_copy_passes(demo_assets, make_variant):
    check_reference_compatible(demo_assets.model_dir, make_variant("identical"))


def test_same_path_returns_without_loading_anything(demo_assets, tmp_path, monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("nothing may be loaded when the reference is the policy")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", boom)
    check_reference_compatible(demo_assets.model_dir, demo_assets.model_dir)
    link = tmp_path / "link_to_policy"
    os.symlink(demo_assets.model_dir, link)
    check_reference_compatible(demo_assets.model_dir, str(link))
    check_reference_compatible(demo_assets.model_dir, demo_assets.model_dir.rstrip("/") + "/")


def test_never_loads_weights(demo_assets, make_variant, monkeypatch):
    """A reference dir with corrupt weights still passes (only tokenizer + config are read), and no model
    class is instantiated."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("check_reference_compatible must not load model weights")

    for cls in (transformers.AutoModel, transformers.AutoModelForCausalLM, transformers.PreTrainedModel):
        monkeypatch.setattr(cls, "from_pretrained", boom)
    ref = make_variant("corrupt_weights", lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file"))
    start = time.perf_counter()
    check_reference_compatible(demo_assets.model_dir, ref)
    assert time.perf_counter() - start < 20  # cheap: tokenizers and configs only
    check_reference_compatible(demo_assets.model_dir, make_variant("no_weights", lambda d: (d / "model.safetensors").unlink()))


def test_different_hidden_size_passes(demo_assets, make_variant):
    """Only the vocabulary (embedding rows) must match; a smaller/larger reference body is fine."""
    def shrink(d):
        _edit_json(d / "config.json", lambda c: c.update(hidden_size=64, intermediate_size=256, num_hidden_layers=1))

    check_reference_compatible(demo_assets.model_dir, make_variant("other_hidden", shrink))


# ---------------------------------------------------------------------------- tokenizer differences
def test_one_added_token_is_named(demo_assets, make_variant):
    def add_token(d):
        tok = _tokenizer(d)
        assert tok.add_tokens(["<foo>"]) == 1
        tok.save_pretrained(str(d))

    ref = make_variant("added_token", add_token)
    new_id = len(_tokenizer(demo_assets.model_dir))
    assert _tokenizer(ref).convert_tokens_to_ids("<foo>") == new_id
    msg = mismatch(demo_assets.model_dir, ref)
    assert msg.startswith("reference tokenizer differs from the policy's")
    assert f"token '<foo>' has id {new_id} in {ref} but is missing in {demo_assets.model_dir}" in msg
    # and the other way round: the policy has the extra token
    msg = mismatch(ref, demo_assets.model_dir)
    assert f"token '<foo>' has id {new_id} in {ref} but is missing in {demo_assets.model_dir}" in msg


def test_same_id_different_piece_is_named(demo_assets, make_variant):
    def adder(token):
        def edit(d):
            tok = _tokenizer(d)
            tok.add_tokens([token])
            tok.save_pretrained(str(d))
        return edit

    policy = make_variant("policy_foo", adder("<foo>"))
    ref = make_variant("ref_bar", adder("<bar>"))
    new_id = len(_tokenizer(demo_assets.model_dir))
    msg = mismatch(policy, ref)
    assert f"id {new_id} is '<foo>' in the policy's tokenizer, '<bar>' in the reference's" in msg


def test_renamed_piece_in_tokenizer_json_is_named(demo_assets, make_variant):
    """Change ONE piece of the model vocabulary (one that no merge produces or uses) in tokenizer.json."""
    tj = json.loads((Path(demo_assets.model_dir) / "tokenizer.json").read_text())
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    used = set()
    for merge in merges:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        used.update(parts)
        used.add("".join(parts))
    specials = {t["content"] for t in tj.get("added_tokens", [])}
    piece, piece_id = next((p, i) for p, i in sorted(vocab.items(), key=lambda kv: kv[1])
                           if p not in used and p not in specials)

    def rename(d):
        def edit(data):
            v = data["model"]["vocab"]
            v["\u2603"] = v.pop(piece)  # a snowman, which the demo text never contains
        _edit_json(d / "tokenizer.json", edit)

    ref = make_variant("renamed_piece", rename)
    assert _tokenizer(ref).convert_ids_to_tokens(piece_id) == "\u2603"
    msg = mismatch(demo_assets.model_dir, ref)
    assert f"id {piece_id} is {piece!r} in the policy's tokenizer, '\u2603' in the reference's" in msg


def test_different_eos_token_is_named(demo_assets, make_variant):
    def set_eos(d):
        tok = _tokenizer(d)
        tok.eos_token = "<unk>"  # an existing token: the vocabulary stays identical
        tok.save_pretrained(str(d))

    ref = make_variant("other_eos", set_eos)
    assert _tokenizer(ref).get_vocab() == _tokenizer(demo_assets.model_dir).get_vocab()
    msg = mismatch(demo_assets.model_dir, ref)
    assert "eos_token: '</s>' (policy) vs '<unk>' (reference)" in msg


def test_new_eos_token_is_named(demo_assets, make_variant):
    def new_eos(d):
        tok = _tokenizer(d)
        tok.add_special_tokens({"eos_token": "<eos>"})
        tok.save_pretrained(str(d))

    msg = mismatch(demo_assets.model_dir, make_variant("new_eos", new_eos))
    assert "'<eos>'" in msg


def test_different_chat_template_names_first_differing_character(demo_assets, make_variant):
    policy_template = _tokenizer(demo_assets.model_dir).chat_template
    assert policy_template

    def edit(d):
        path = d / "chat_template.jinja"
        text = path.read_text()
        assert "' Answer:'" in text
        path.write_text(text.replace("' Answer:'", "' A:'"))

    ref = make_variant("other_template", edit)
    ref_template = _tokenizer(ref).chat_template
    first = next(i for i, (a, b) in enumerate(zip(policy_template, ref_template)) if a != b)
    msg = mismatch(demo_assets.model_dir, ref)
    assert f"chat_template differs (first difference at character {first}" in msg


def test_missing_chat_template_is_named(demo_assets, make_variant):
    ref = make_variant("no_template", lambda d: (d / "chat_template.jinja").unlink())
    assert not _tokenizer(ref).chat_template
    msg = mismatch(demo_assets.model_dir, ref)
    assert "chat_template is set in the policy's tokenizer but missing in the reference's" in msg


def test_same_vocab_different_encoding_is_named(demo_assets, make_variant):
    """Equal vocabularies and specials, but the reference does not add BOS: every sequence shifts."""
    def no_bos(d):
        def edit(data):
            pp = data["post_processor"]
            assert pp["type"] == "TemplateProcessing"
            pp["single"] = [piece for piece in pp["single"] if "SpecialToken" not in piece]
            pp["pair"] = [piece for piece in pp["pair"] if "SpecialToken" not in piece]
        _edit_json(d / "tokenizer.json", edit)

    ref = make_variant("no_bos", no_bos)
    assert _tokenizer(ref)("hi")["input_ids"] != _tokenizer(demo_assets.model_dir)("hi")["input_ids"]
    msg = mismatch(demo_assets.model_dir, ref)
    assert "encoding" in msg and "differs at token 0: 1 (policy)" in msg


# ---------------------------------------------------------------------------- embedding size
def test_different_config_vocab_size_is_named(demo_assets, make_variant):
    def grow(d):
        _edit_json(d / "config.json", lambda c: c.update(vocab_size=c["vocab_size"] + 1))

    policy_vocab = json.loads((Path(demo_assets.model_dir) / "config.json").read_text())["vocab_size"]
    msg = mismatch(demo_assets.model_dir, make_variant("bigger_vocab", grow))
    assert f"vocab_size {policy_vocab} (policy config) vs {policy_vocab + 1} (reference config)" in msg


# ---------------------------------------------------------------------------- errors
def test_unloadable_reference_is_reported(demo_assets, tmp_path):
    missing = str(tmp_path / "does_not_exist")
    msg = mismatch(demo_assets.model_dir, missing)
    assert missing in msg and "tokenizer" in msg


def test_mismatch_is_a_config_error_and_value_error():
    assert issubclass(ReferenceMismatch, ValueError)
    assert issubclass(ReferenceMismatch, ConfigError)  # the trainer reports ConfigErrors without a traceback
