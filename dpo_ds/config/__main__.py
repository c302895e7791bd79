"""`python -m dpo_ds.config --markdown > docs/configuration.md`."""
import argparse

from dpo_ds.config.reference import markdown_reference

cli = argparse.ArgumentParser(prog="python -m dpo_ds.config", description="Print the configuration reference.")
cli.add_argument("--markdown", action="store_true", required=True, help="as Markdown: the text of docs/configuration.md")
cli.parse_args()
print(markdown_reference(), end="")
