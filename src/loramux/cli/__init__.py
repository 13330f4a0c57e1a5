"""`loramux` command line: a table of plain typed functions over the Python API.

Errors of bad input (LoramuxError) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import sys

import typer

from . import bench, data, library, model, router
from .demo import demo
from .eval import eval_
from .export import export
from .generate import generate
from .score import score
from .serve import serve
from .train import train

app = typer.Typer(
    name="loramux",
    help="Build a library of LoRA adapters on one base model and fuse them per input.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.add_typer(library.app, name="library")
app.add_typer(bench.app, name="bench")
app.add_typer(router.app, name="router")
app.command()(router.route)
app.command()(train)
app.command()(score)
app.command()(generate)
app.command()(demo)
app.command("eval")(eval_)
app.command()(serve)
app.command()(export)


def main(argv: list[str] | None = None) -> None:
    import warnings

    from ..errors import LoramuxError

    # PEFT still calls a transformers API that transformers 5 deprecates; not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    try:
        # Outside standalone mode click *returns* the code of a typer.Exit instead of exiting.
        code = app(args=argv, prog_name="loramux", standalone_mode=False)
    except LoramuxError as e:
        print(f"loramux: error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click usage errors in non-standalone mode
        import click

        # typer ships its own copy of click, whose usage errors are TyperExceptions, not click's
        vendored = getattr(typer, "TyperException", ())  # absent from typers that use click itself
        if isinstance(e, click.ClickException) or (isinstance(e, vendored) and hasattr(e, "show")):
            e.show()
            sys.exit(e.exit_code)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
