"""`python -m services.cli` is the `weir` command (the `./weir` script passes its commands here)."""

from services.cli.main import run

run()
