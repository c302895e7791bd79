"""Config loading: errors name file, line and field; cross-field checks fail before any model is loaded;
`dpo-ds train --help` documents every field."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_ds.config import (FIELDS, LOSS_TYPES, ConfigError, TrainConfig, add_config_arguments, config_from_args,
                           load_config, resolve_precision, to_dict, validate)

REPO = Path(__file__).resolve().parent.parent
REQUIRED = {"model_name_or_path": "m", "train_file": "t.jsonl"}


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def cfg_of(**fields) -> TrainConfig:
    return TrainConfig(**{**REQUIRED, **fields})


def config_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------- YAML: file, line, field
def test_minimal_yaml_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\n"))
    assert cfg == TrainConfig(model_name_or_path="m", train_file="t.jsonl", precision=resolve_precision("auto"))


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\n# a comment\n\nbetta: 0.2\n")
    msg = config_error(load_config, path)
    assert f"{path}:5" in msg
    assert "'betta'" in msg
    assert "did you mean 'beta'" in msg


def test_unknown_key_without_near_miss_has_no_bogus_suggestion(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\nzzzzqqq: 1\ntrain_file: t.jsonl\n")
    msg = config_error(load_config, path)
    assert f"{path}:2" in msg and "'zzzzqqq'" in msg
    assert "did you mean" not in msg


def test_wrong_type_names_file_line_and_field(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\n\nbeta: abc\n")
    msg = config_error(load_config, path)
    assert f"{path}:4: field 'beta'" in msg
    assert "abc" in msg


@pytest.mark.parametrize("line,field", [
    ("max_length: 1.5", "max_length"),        # float for an int
    ("max_length: true", "max_length"),       # bool is not an int
    ("max_length: many", "max_length"),
    ("micro_batch_size: [1, 2]", "micro_batch_size"),
    ("shuffle: maybe", "shuffle"),
    ("learning_rate: fast", "learning_rate"),
    ("learning_rate: false", "learning_rate"),  # bool is not a number
    ("loss_type: dpo", "loss_type"),           # not one of the choices
    ("precision: fp16", "precision"),
    ("lr_scheduler: step", "lr_scheduler"),
    ("attn_implementation: flash", "attn_implementation"),
    ("output_dir: {a: 1}", "output_dir"),
    ("beta: null", "beta"),                   # a non-Optional field needs a value
])
def test_bad_values_name_line_and_field(tmp_path, line, field):
    path = write(tmp_path, f"model_name_or_path: m\ntrain_file: t.jsonl\n{line}\n")
    msg = config_error(load_config, path)
    assert f"{path}:3: field '{field}'" in msg


def test_choice_error_lists_the_choices(tmp_path):
    msg = config_error(load_config, write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nloss_type: dpo\n"))
    for choice in LOSS_TYPES:
        assert choice in msg


def test_trl_dpo_config_loss_fields_load_unchanged(tmp_path):
    """The loss fields of a TRL DPOConfig YAML (MPO's recipe) are dpo-ds fields of the same names and meaning."""
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nloss_type: [sigmoid, bco_pair, sft]\n"
                           "loss_weights: [0.8, 0.2, 1.0]\nbeta: 0.05\nlabel_smoothing: 0.1\nld_alpha: null\n"
                           "use_weighting: true\n")
    cfg = load_config(str(path))
    assert (cfg.loss_type, cfg.loss_weights, cfg.beta, cfg.label_smoothing, cfg.ld_alpha, cfg.use_weighting) == (
        "sigmoid,bco_pair,sft", "0.8,0.2,1.0", 0.05, 0.1, None, True)
    assert load_config(str(write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nloss_type: aot_pair\n"
                                           "ld_alpha: 0.5\n"))).loss_type == "aot_unpaired"  # older TRL name
    assert load_config(None, {"model_name_or_path": "m", "train_file": "t", "loss_type": "sigmoid,sft",
                              "loss_weights": "1,0.5"}).loss_weights == "1.0,0.5"  # as --loss_weights 1,0.5


@pytest.mark.parametrize("line,words", [
    ("loss_type: [sigmoid, dpo]", "'dpo' is not one of sigmoid, sigmoid_norm"),
    ("loss_type: [sigmoid, sigmoid]", "'sigmoid' is listed twice"),
    ("loss_type: []", "expected a loss name"),
    ("loss_weights: [0.5, abc]", "expected a list of numbers"),
    ("loss_weights: [.inf]", "finite"),
])
def test_bad_loss_lists_name_line_and_field(tmp_path, line, words):
    path = write(tmp_path, f"model_name_or_path: m\ntrain_file: t.jsonl\n{line}\n")
    msg = config_error(load_config, path)
    assert f"{path}:3: field '{line.split(':')[0]}'" in msg and words in msg, msg
    assert "\n" not in msg


def test_wrong_weights_length_names_the_file_line(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nloss_type: [sigmoid, bco_pair, sft]\n"
                           "loss_weights: [0.8, 0.2]\n")
    msg = config_error(load_config, path)
    assert f"{path}:4: field 'loss_weights': 2 weights for the 3 losses" in msg, msg


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nbeta: [0.1\nseed: 3\n")
    msg = config_error(load_config, path)
    assert re.search(re.escape(path) + r":\d+: invalid YAML", msg), msg


def test_non_mapping_yaml(tmp_path):
    path = write(tmp_path, "- model_name_or_path: m\n")
    msg = config_error(load_config, path)
    assert f"{path}:1" in msg and "mapping" in msg


def test_missing_config_file(tmp_path):
    msg = config_error(load_config, str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in msg and "not found" in msg


def test_multi_line_values_report_the_key_line(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\noutput_dir: >\n  runs/x\nmax_length:\n  lots\n")
    msg = config_error(load_config, path)
    assert f"{path}:5: field 'max_length'" in msg


# ---------------------------------------------------------------------------- type coercion
@pytest.mark.parametrize("text,expected", [
    ("true", True), ("false", False), ("True", True), ("FALSE", False), ("yes", True), ("no", False),
    ('"true"', True), ('"false"', False), ("'False'", False),
])
def test_bools_from_yaml_and_strings(tmp_path, text, expected):
    cfg = load_config(write(tmp_path, f"model_name_or_path: m\ntrain_file: t.jsonl\nshuffle: {text}\n"))
    assert cfg.shuffle is expected


@pytest.mark.parametrize("text,expected", [("true", True), ("false", False), ("True", True), ("0", False), ("1", True)])
def test_bools_from_command_line_strings(text, expected):
    cfg = load_config(None, {**REQUIRED, "shuffle": text, "ref_offload": text})
    assert cfg.shuffle is expected and cfg.ref_offload is expected


@pytest.mark.parametrize("value,want", [(True, "true"), (False, "false"), ("yes", "true"), ("0", "false"),
                                        ("auto", "auto")])
def test_gradient_checkpointing_takes_bools_and_auto(value, want):
    assert load_config(None, {**REQUIRED, "gradient_checkpointing": value}).gradient_checkpointing == want
    with pytest.raises(ConfigError, match="field 'gradient_checkpointing': 'sometimes' is not one of auto, true, false"):
        load_config(None, {**REQUIRED, "gradient_checkpointing": "sometimes"})


def test_numbers_from_yaml_including_exponent_without_dot(tmp_path):
    # YAML 1.1 reads `1e-6` as a string: it must still become a float
    cfg = load_config(write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nlearning_rate: 1e-6\n"
                                      "beta: 1\nmax_length: 64\nadam_epsilon: 1.0e-7\n"))
    assert cfg.learning_rate == 1e-6 and isinstance(cfg.learning_rate, float)
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float)
    assert cfg.max_length == 64 and isinstance(cfg.max_length, int)
    assert cfg.adam_epsilon == 1e-7


@pytest.mark.parametrize("null", [
    "null", "~", "None", "",
])
def test_optional_fields_accept_null(tmp_path, null):
    cfg = load_config(write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\n"
                                      f"max_prompt_length: {null}\nref_model_name_or_path: {null}\n"
                                      f"eval_file: {null}\ndeepspeed_config: {null}\n"))
    assert cfg.max_prompt_length is None and cfg.ref_model_name_or_path is None
    assert cfg.eval_file is None and cfg.deepspeed_config is None


def test_empty_value_for_non_optional_field_is_a_config_error(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nbeta:\n")
    msg = config_error(load_config, path)
    assert f"{path}:3: field 'beta'" in msg


def test_optional_fields_accept_null_on_command_line():
    cfg = load_config(None, {**REQUIRED, "max_prompt_length": "null", "eval_file": "none"})
    assert cfg.max_prompt_length is None and cfg.eval_file is None


def test_optional_int_takes_a_value():
    assert load_config(None, {**REQUIRED, "max_prompt_length": "128"}).max_prompt_length == 128


# ---------------------------------------------------------------------------- command-line overrides
def test_cli_override_wrong_type_mentions_flag():
    msg = config_error(load_config, None, {**REQUIRED, "beta": "abc"})
    assert "--beta" in msg and "abc" in msg


def test_cli_override_beats_yaml(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nbeta: 0.3\nseed: 1\n")
    cfg = load_config(path, {"beta": "0.05"})
    assert cfg.beta == 0.05 and cfg.seed == 1


def test_argparse_flags_round_trip(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    (tmp_path / "m").mkdir()  # config_from_args checks that the paths exist
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "t.jsonl").write_text("")
    path = write(tmp_path, f"model_name_or_path: {tmp_path / 'm'}\ntrain_file: {tmp_path / 't.jsonl'}\nloss_type: ipo\n")
    args = parser.parse_args(["--config", path, "--beta", "0.25", "--shuffle", "false", "--max_prompt_length", "8"])
    cfg = config_from_args(args)
    assert (cfg.loss_type, cfg.beta, cfg.shuffle, cfg.max_prompt_length) == ("ipo", 0.25, False, 8)
    assert to_dict(cfg)["beta"] == 0.25
    # flags not given keep the YAML value / the default (SUPPRESS: nothing is overridden by accident)
    assert cfg.seed == TrainConfig.seed


@pytest.mark.distributed
def test_cli_wrong_type_exits_2_with_message():
    proc = subprocess.run([sys.executable, "-m", "dpo_ds", "train", "--model_name_or_path", "/nonexistent/model",
                           "--train_file", "/nonexistent/t.jsonl", "--beta", "abc"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--beta" in proc.stderr and "abc" in proc.stderr


@pytest.mark.distributed
def test_invalid_combination_fails_before_any_model_or_data_is_touched(tmp_path):
    """The model and data paths do not exist: the error must be the config's, not a load failure."""
    proc = subprocess.run([sys.executable, "-m", "dpo_ds", "train", "--model_name_or_path", str(tmp_path / "no_model"),
                           "--train_file", str(tmp_path / "no_data.jsonl"), "--loss_type", "simpo",
                           "--ref_model_name_or_path", str(tmp_path / "no_ref"), "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ref_model_name_or_path" in proc.stderr and "simpo" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- cross-field validation
@pytest.mark.parametrize("fields,field,words", [
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing", "0.5"),
    (dict(loss_type="robust", label_smoothing=0.7), "label_smoothing", "0.7"),
    (dict(loss_type="sigmoid", label_smoothing=0.5), "label_smoothing", "0.5"),
    (dict(label_smoothing=-0.1), "label_smoothing", "-0.1"),
    (dict(loss_type="simpo", ref_model_name_or_path="/r"), "ref_model_name_or_path", "simpo"),
    (dict(loss_type="sft", ref_model_name_or_path="/r"), "ref_model_name_or_path", "sft"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing", "ipo"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing", "hinge"),
    (dict(loss_type="simpo", label_smoothing=0.1), "label_smoothing", "simpo"),
    (dict(loss_type="ipo", length_normalize=True), "length_normalize", "ipo"),
    (dict(loss_type="simpo", length_normalize=True), "length_normalize", "simpo"),
    (dict(loss_type="sft", length_normalize=True), "length_normalize", "sft"),
    (dict(max_length=128, max_prompt_length=128), "max_prompt_length", "128"),
    (dict(max_length=128, max_prompt_length=500), "max_prompt_length", "500"),
    (dict(max_prompt_length=0), "max_prompt_length", "0"),
    (dict(model_name_or_path=None), "model_name_or_path", "required"),
    (dict(train_file=None), "train_file", "required"),
    (dict(beta=0.0), "beta", "0"),
    (dict(beta=-1.0), "beta", "-1"),
    (dict(rpo_alpha=-0.5), "rpo_alpha", "-0.5"),
    (dict(max_length=0), "max_length", "0"),
    (dict(micro_batch_size=0), "micro_batch_size", "0"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps", "0"),
    (dict(max_steps=-1), "max_steps", "-1"),
    (dict(logging_steps=0), "logging_steps", ">= 1"),
    (dict(learning_rate=-1e-5), "learning_rate", ">= 0"),
    (dict(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2"), "loss_weights", "2 weights for the 3 losses"),
    (dict(loss_type="sigmoid", loss_weights="1.0,1.0"), "loss_weights", "one weight per loss"),
    (dict(loss_type="sigmoid,sft", loss_weights="1.0,-0.5"), "loss_weights", ">= 0"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau", "> 0"),
    (dict(ld_alpha=1.5), "ld_alpha", "[0, 1]"),
    (dict(loss_type="apo_zero", label_smoothing=0.1), "label_smoothing", "exo_pair"),
    (dict(loss_type="simpo,sft", ref_model_name_or_path="/r"), "ref_model_name_or_path", "simpo,sft"),
    (dict(loss_type="ipo,sigmoid_norm", length_normalize=True), "length_normalize", "ipo,sigmoid_norm"),
    (dict(loss_type="kto,sigmoid"), "loss_type", "kto trains on unpaired examples"),
    (dict(loss_type="kto", rpo_alpha=0.5), "rpo_alpha", "only applies to losses on preference pairs"),
    (dict(loss_type="kto", use_weighting=True), "use_weighting", "only applies to losses on preference pairs"),
    (dict(loss_type="kto", ld_alpha=0.5), "ld_alpha", "only applies to losses on preference pairs"),
    (dict(loss_type="kto", desirable_weight=0.0), "desirable_weight", "> 0"),
    (dict(loss_type="sigmoid", undesirable_weight=2.0), "undesirable_weight", "kto"),
])
def test_validate_rejects(fields, field, words):
    msg = config_error(validate, cfg_of(**fields))
    assert f"field '{field}'" in msg
    assert words in msg


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_its_package_is_refused_before_loading():
    msg = config_error(validate, cfg_of(attn_implementation="flash_attention_2"))
    assert "field 'attn_implementation'" in msg and "flash_attn package" in msg


@pytest.mark.parametrize("fields", [
    dict(loss_type="robust", label_smoothing=0.49),
    dict(loss_type="sigmoid", label_smoothing=0.2, length_normalize=True),
    dict(loss_type="hinge", length_normalize=True),
    dict(loss_type="ipo", ref_model_name_or_path="/r"),
    dict(loss_type="simpo", simpo_gamma=1.0, rpo_alpha=0.1),
    dict(loss_type="sft"),
    dict(max_length=128, max_prompt_length=127),
    dict(max_prompt_length=1, max_length=2),
    dict(reference_free=True),
    dict(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.0"),
    dict(loss_type="exo_pair", label_smoothing=0.1),
    dict(loss_type="aot", label_smoothing=0.1),
    dict(loss_type="ipo,sigmoid", length_normalize=True),  # applies to sigmoid
    dict(loss_type="simpo,sigmoid", ref_model_name_or_path="/r"),  # sigmoid reads the reference
    dict(loss_type="discopop", discopop_tau=0.3, ld_alpha=0.5),
])
def test_validate_accepts(fields):
    validate(cfg_of(**fields))


def test_missing_required_fields_from_yaml(tmp_path):
    msg = config_error(load_config, write(tmp_path, "train_file: t.jsonl\n"))
    assert "model_name_or_path" in msg
    msg = config_error(load_config, write(tmp_path, "model_name_or_path: m\n"))
    assert "train_file" in msg
    msg = config_error(load_config, write(tmp_path, ""))  # empty file: nothing set
    assert "model_name_or_path" in msg


def test_validation_runs_in_load_config(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nloss_type: ipo\nlength_normalize: true\n")
    assert "length_normalize" in config_error(load_config, path)


def test_every_loss_type_is_configurable():
    for loss_type in LOSS_TYPES:
        assert load_config(None, {**REQUIRED, "loss_type": loss_type}).loss_type == loss_type


@pytest.mark.parametrize("value", ["nan", ".nan", "inf"])
def test_non_finite_beta_is_rejected(tmp_path, value):
    path = write(tmp_path, f"model_name_or_path: m\ntrain_file: t.jsonl\nbeta: {value}\n")
    msg = config_error(load_config, path)
    assert f"{path}:3: field 'beta': expected a finite number" in msg


def test_duplicate_key_names_both_lines(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nbeta: 0.1\nbeta: 0.2\n")
    assert f"{path}:4: field 'beta' is set twice (first at line 3)" in config_error(load_config, path)


def test_validate_errors_name_where_the_value_was_set(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nloss_type: robust\nlabel_smoothing: 0.5\n")
    assert f"{path}:4: field 'label_smoothing'" in config_error(load_config, path)
    msg = config_error(load_config, None, {**REQUIRED, "reference_free": "true", "ref_model_name_or_path": "r"})
    assert "command line --ref_model_name_or_path: field 'ref_model_name_or_path'" in msg


# ---------------------------------------------------------------------------- --help
@pytest.mark.distributed
def test_train_help_lists_every_field_with_its_help():
    env = {**os.environ, "COLUMNS": "2000"}
    proc = subprocess.run([sys.executable, "-m", "dpo_ds", "train", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    squashed = re.sub(r"\s+", "", out)
    assert "--config" in out
    missing_flags = [f.name for f in dataclasses.fields(TrainConfig) if not re.search(rf"--{f.name}\b", out)]
    assert not missing_flags, f"--help lacks flags for {missing_flags}"
    missing_help = [f.name for f in dataclasses.fields(TrainConfig)
                    if re.sub(r"\s+", "", f.metadata["help"]) not in squashed]
    assert not missing_help, f"--help lacks the help text of {missing_help}"
    assert set(FIELDS) == {f.name for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(TrainConfig):  # every field documents itself
        assert f.metadata.get("help"), f.name
        assert not (isinstance(f.default, float) and math.isnan(f.default))


def test_configuration_reference_is_generated_from_train_config():
    """docs/configuration.md is `markdown_reference()` verbatim, and lists every field with its default."""
    from dpo_ds.config.reference import REFERENCE_COMMAND, markdown_reference

    generated = markdown_reference()
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert reference == generated, f"docs/configuration.md is out of date with TrainConfig: run `{REFERENCE_COMMAND}`"
    for f in dataclasses.fields(TrainConfig):
        default = "—" if f.default is None else (str(f.default).lower() if isinstance(f.default, bool) else str(f.default))
        row = next((line for line in reference.splitlines() if line.startswith(f"| `{f.name}` | ")), None)
        assert row is not None, f"docs/configuration.md has no row for {f.name}"
        assert default in row and f.metadata["help"].replace("|", "\\|") in row, (f.name, row)


# ---------------------------------------------------------------------------- paths, before anything loads
def train_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo_ds", "train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


@pytest.fixture
def fake_run_inputs(tmp_path):
    """A model directory and a pairs file that pass the path checks (nothing here is loadable)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n")
    return model, pairs


@pytest.mark.parametrize("field,value,words", [
    ("model_name_or_path", "demo_runs/assets/modle", "no such directory"),  # three parts: a path, never a hub id
    ("model_name_or_path", "my_runs/nosuch", "not in the local Hugging Face cache"),  # hub-shaped, offline
    ("model_name_or_path", "{tmp}/pairs.jsonl", "not a directory"),
    ("model_name_or_path", "{tmp}", "no config.json"),
    ("ref_model_name_or_path", "{tmp}/no_ref", "no such directory"),
    ("train_file", "{tmp}/nosuch.jsonl", "no such file or directory"),
    ("eval_file", "{tmp}/held.jsonl", "no such file or directory"),
    ("deepspeed_config", "{tmp}/ds.json", "no such file or directory"),
    ("resume_from", "{tmp}/run/checkpoints/step-00000002", "no such file or directory"),
])
@pytest.mark.distributed
def test_missing_path_is_one_line_config_error_before_anything_loads(fake_run_inputs, tmp_path, field, value, words):
    """Issue 13 items 1-2: was a 29-78 line traceback (or a 49 s hub retry) after the tokenizer had loaded."""
    model, pairs = fake_run_inputs
    value = value.format(tmp=tmp_path)
    args = {"model_name_or_path": str(model), "train_file": str(pairs), "output_dir": str(tmp_path / "out"), field: value}
    proc = train_cli([a for k, v in args.items() for a in (f"--{k}", v)], env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = error_lines(proc)  # one line, no traceback
    assert line.startswith("dpo-ds train: error: ") and f"field '{field}'" in line and value in line and words in line
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_refused_start_leaves_the_run_folder_untouched(fake_run_inputs, tmp_path):
    """Issue 13 item 3: run_config.json was overwritten before the start was refused."""
    model, pairs = fake_run_inputs
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-00000004\n")
    (out / "run_config.json").write_text('{"beta": 0.3}\n')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = train_cli(["--model_name_or_path", str(model), "--train_file", str(pairs), "--output_dir", str(out),
                      "--beta", "0.5"])
    assert proc.returncode == 2 and "already holds a run's outputs (run_config.json, checkpoints/)" in proc.stderr, proc.stderr[-3000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_precision_auto_resolves_to_fp32_on_cpu(tmp_path):
    """Issue 13 item 8: a config without `precision` trained and exported bf16 on a CPU."""
    assert FIELDS["precision"].default == "auto"
    assert load_config(write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\n")).precision == "fp32"
    assert load_config(None, {**REQUIRED, "precision": "bf16"}).precision == "bf16"


# ---------------------------------------------------------------------------------------- LoRA
def test_lora_fields_from_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "model_name_or_path: m\ntrain_file: t.jsonl\nlora_r: 16\nlora_alpha: 32\n"
                                      "lora_target_modules: [q_proj, v_proj]\n"))
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules) == (16, 32.0, "q_proj,v_proj")


@pytest.mark.parametrize("fields,field,words", [
    (dict(lora_r=-1), "lora_r", "0 = full fine-tuning"),
    (dict(lora_r=8, lora_alpha=0.0), "lora_alpha", "> 0"),
    (dict(lora_r=8, lora_dropout=1.0), "lora_dropout", "[0, 1)"),
    (dict(lora_r=8, lora_target_modules=" , "), "lora_target_modules", "names no module"),
    (dict(lora_r=8, ref_model_name_or_path="other"), "ref_model_name_or_path", "no separate reference model"),
    (dict(lora_quantize="nf4"), "lora_quantize", "set lora_r"),
])
def test_lora_config_errors(fields, field, words):
    message = config_error(validate, cfg_of(**fields))
    assert f"field '{field}'" in message and words in message, message


def test_qlora_needs_a_device_bitsandbytes_supports_and_the_package(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"")
    qlora = cfg_of(model_name_or_path=str(tmp_path), lora_r=8, lora_quantize="nf4")
    validate(qlora)  # CPU: bitsandbytes quantizes and runs nf4 there
    monkeypatch.setenv("DS_ACCELERATOR", "npu")
    message = config_error(validate, qlora)
    assert "field 'lora_quantize'" in message and "none for npu" in message and "cuda, cpu" in message, message
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    assert "pip install 'dpo-ds[qlora]'" in config_error(validate, qlora)
    # final/ merges into the original weights: refused before anything loads when they are not a local directory
    from dpo_ds.lora import load_quantized_base

    (tmp_path / "model.safetensors").unlink()
    message = config_error(load_quantized_base, qlora, None, None)
    assert "field 'lora_quantize'" in message and "local safetensors model directory" in message, message


def test_lora_adapter_must_be_a_lora_peft_directory(tmp_path):
    assert "adapter_config.json not found" in config_error(validate, cfg_of(lora_adapter=str(tmp_path)))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    assert "only LoRA adapters" in config_error(validate, cfg_of(lora_adapter=str(tmp_path)))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    validate(cfg_of(lora_adapter=str(tmp_path)))
    assert "no separate reference model" in config_error(
        validate, cfg_of(lora_adapter=str(tmp_path), ref_model_name_or_path="other"))


def test_eval_and_prepare_build_their_config_as_train_does(tmp_path, capsys):
    """One way to build a config: `dpo-ds eval` takes precision auto as train resolves it (not a default of its
    own), the run's loss settings under its flags, and `dpo-ds prepare` checks paths before loading anything."""
    import argparse

    from dpo_ds import cli, evaluate

    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "config.json").write_text("{}")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (run_dir / "run_config.json").write_text(json.dumps({"beta": 0.3, "loss_type": "ipo", "label_smoothing": 0.0,
                                                         "model_name_or_path": str(tmp_path / "base")}))
    data = tmp_path / "held_out.jsonl"
    data.write_text("")
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    cfg = evaluate.eval_config(parser.parse_args(["--model", str(run_dir / "final"), "--data", str(data)]))
    assert (cfg.precision, cfg.loss_type, cfg.beta, cfg.micro_batch_size) == (resolve_precision("auto"), "ipo", 0.3, 8)
    assert cfg.ref_model_name_or_path == str(tmp_path / "base") and not cfg.reference_free  # the run's reference
    assert cfg.train_file == str(data)
    cfg = evaluate.eval_config(parser.parse_args(["--model", str(run_dir / "final"), "--data", str(data),
                                                  "--ref_model", "none"]))
    assert cfg.reference_free and cfg.ref_model_name_or_path is None
    cfg = evaluate.eval_config(parser.parse_args(["--model", str(run_dir / "final"), "--data", str(data),
                                                  "--beta", "0.5"]))
    assert cfg.beta == 0.5  # the flag over the run's value
    missing = config_error(evaluate.eval_config, parser.parse_args(["--model", str(run_dir / "final"),
                                                                     "--data", str(tmp_path / "none.jsonl")]))
    assert "field 'train_file'" in missing and "none.jsonl" in missing
    assert cli.main(["prepare", "--model_name_or_path", str(run_dir / "final"),
                     "--train_file", str(tmp_path / "none.jsonl")]) == 2
    assert "field 'train_file'" in capsys.readouterr().err


def test_train_help_lists_every_loss():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    for name in (*LOSS_TYPES, "aot_pair"):
        assert name in text, name
