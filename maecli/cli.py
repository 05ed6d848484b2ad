"""The `maecli` command line: parse, load the project file, call one function, print a summary.

Library code raises `MaecliError`; this module alone turns it into one line per problem on stderr and
an exit code (2: configuration or usage, 1: runtime). Heavy imports (torch, timm) happen inside commands.
"""

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from maecli import __version__
from maecli.config import CONFIG_NAME, MaecliConfig, dump_toml, load_config, write_template
from maecli.errors import MaecliError

app = typer.Typer(
    name="maecli",
    help="Masked Autoencoder pretraining on unlabeled video: extract, pretrain, visualize, export, probe.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, highlight=False)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="The project file (or its folder).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a project-file value: section.key=value (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]


def reports_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MaecliError into its lines on stderr and its exit code; anything else keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MaecliError as err:
            for line in err.lines:
                console.print(line, markup=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"maecli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Masked Autoencoder pretraining on unlabeled video."""


@app.command()
@reports_errors
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the new project file.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing project file.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a commented maecli.toml with every option at its default."""
    path = write_template(directory, force=force)
    if json_out:
        print_json({"config": str(path)})
    else:
        console.print(f"Wrote {path}. Edit it, then check it with: maecli config -c {path}", markup=False, soft_wrap=True)


@app.command("config")
@reports_errors
def show_config(config: ConfigOpt = Path(CONFIG_NAME), set_: SetOpt = None, json_out: JsonOpt = False) -> None:
    """Validate the project file and print the resolved config (overrides applied, paths absolute)."""
    cfg: MaecliConfig = load_config(config, set_ or [])
    if json_out:
        print_json(cfg.model_dump(mode="json"))
    else:
        typer.echo(dump_toml(cfg), nl=False)
