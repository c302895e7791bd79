from dpo_ds.cli import entry

entry()
