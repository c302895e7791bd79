"""Every path a run reads exists and is readable, checked before anything loads: a ConfigError naming the field
and the path instead of a library traceback after minutes of loading (or a long hub retry)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from dpo_ds.config.errors import ConfigError

if TYPE_CHECKING:
    from dpo_ds.config import TrainConfig

# Fields naming a model directory (or a hub id) and fields naming a file or directory the run reads.
MODEL_PATH_FIELDS = ("model_name_or_path", "ref_model_name_or_path")
INPUT_PATH_FIELDS = ("train_file", "eval_file", "deepspeed_config", "ref_deepspeed_config", "resume_from")
HUB_CHECK_TIMEOUT_S = 5.0


def check_paths(cfg: TrainConfig, skip: tuple[str, ...] = ()) -> None:
    """Every path the run reads exists and is readable: a ConfigError naming the field and the path before
    any model, tokenizer or data is loaded (a missing path would otherwise surface as a library traceback,
    after minutes of loading or a long hub retry). `skip`: fields the command fills itself (bench)."""
    for name in INPUT_PATH_FIELDS:
        value = getattr(cfg, name)
        if value is None or name in skip or (name == "resume_from" and value == "auto"):
            continue
        if not Path(value).exists():
            raise ConfigError(f"field '{name}': {value}: no such file or directory", name)
        _check_readable(name, Path(value))
    for name in MODEL_PATH_FIELDS:
        value = getattr(cfg, name)
        if value is not None and name not in skip:
            check_model_path(name, value)


def _check_readable(name: str, path: Path) -> None:
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ConfigError(f"field '{name}': {path}: not readable (permission denied)", name)


def check_model_path(name: str, value: str) -> None:
    """A model directory with a config.json, or a hub id that is in the local Hugging Face cache or that the
    hub confirms within HUB_CHECK_TIMEOUT_S (transformers would otherwise retry for most of a minute)."""
    path = Path(value)
    if path.is_dir():
        _check_readable(name, path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"field '{name}': {value}: not a Hugging Face model directory (no config.json)", name)
        _check_readable(name, path / "config.json")
        return
    if path.exists():
        raise ConfigError(f"field '{name}': {value}: not a directory (a model is a directory with config.json)", name)
    parts = value.split("/")
    if value.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts):
        raise ConfigError(f"field '{name}': {value}: no such directory", name)
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(huggingface_hub.try_to_load_from_cache(value, "config.json"), str):
        return
    try:
        huggingface_hub.model_info(value, timeout=HUB_CHECK_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ConfigError(f"field '{name}': {value}: no such directory, and no such model on the Hugging Face hub", name) from None
    except Exception as err:  # offline mode, no network, timeout, gated repo: nothing to load either way
        raise ConfigError(f"field '{name}': {value}: no such directory, not in the local Hugging Face cache, and the "
                          f"hub could not confirm it ({type(err).__name__})", name) from None
