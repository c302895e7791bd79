import sys

from dpo_ds.cli import main

sys.exit(main())
