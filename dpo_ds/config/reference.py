"""docs/configuration.md, generated from TrainConfig: every field by group with its default, the values its flag
takes and its help text (the same text `dpo-ds train --help` prints)."""
from __future__ import annotations

import argparse
import dataclasses

from dpo_ds.config import TrainConfig, add_config_arguments

REFERENCE_COMMAND = "python -m dpo_ds.config --markdown > docs/configuration.md"
GROUP_TITLES = {"model": "Model", "lora": "LoRA", "data": "Data", "loss": "Loss", "guards": "Drift and stability guards",
                "optim": "Optimization", "engine": "Engine", "output": "Outputs and monitoring"}


def markdown_reference() -> str:
    """The configuration reference (docs/configuration.md): every TrainConfig field by group, with its default,
    the values its flag takes and its help text, the same text `dpo-ds train --help` prints."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    metavars = {action.dest: action.metavar for action in parser._actions}
    lines = ["# Configuration reference", "",
             f"<!-- Generated from dpo_ds/config's TrainConfig by `{REFERENCE_COMMAND}`; do not edit. -->", "",
             "Every field is a YAML key of the `--config` file and a `--field value` flag of `dpo-ds train`, "
             "`prepare` and `bench` (flags win over the file); `dpo-ds train --help` prints the same text. Values "
             "are checked before any model loads, and an error names the file, line and field "
             "(`run.yaml:7: field 'beta': expected a number, got 'abc'`). A `—` default means unset.", ""]
    by_group: dict[str, list[dataclasses.Field]] = {}
    for f in dataclasses.fields(TrainConfig):
        by_group.setdefault(f.metadata["group"], []).append(f)
    for group, fields in by_group.items():
        lines += [f"## {GROUP_TITLES[group]}", "", "| field | default | value | meaning |", "|---|---|---|---|"]
        for f in fields:
            default = "—" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
            cells = (f"`{f.name}`", f"`{default}`" if f.default is not None else default, f"`{metavars[f.name]}`",
                     f.metadata["help"])
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)
