"""Options shared by every command that runs the model (a typer option object may be shared).
Kept apart from `common.py` so that importing them stays light: `loramux --help` loads no torch."""

import typer

from ..models import DEVICE_HELP, DTYPE_HELP

DEVICE = typer.Option("auto", "--device", help=DEVICE_HELP)
DTYPE = typer.Option("auto", "--dtype", help=DTYPE_HELP)
