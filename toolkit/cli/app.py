"""The ``toolkit`` Typer app and what every command shares: one-line errors (exit codes from the error tree),
progress steps, option parsing, full-width tables."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from toolkit.errors import ConfigError, ToolkitError

__all__ = ["app", "console", "fail", "int_list", "one_line_errors", "parse_device", "parse_precision_target", "stdout_console", "step"]


# plain (click) help: Rich help cuts option names and [default: ...] notes at 80 columns when piped
app = typer.Typer(help="Export Hugging Face embedding models to one verified ONNX artifact, and serve it.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 120})
console = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from toolkit import __version__

        print(f"onnx-embed-toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    """Export Hugging Face embedding models to one verified ONNX artifact, and serve it."""


def fail(exc: ToolkitError) -> None:
    console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def one_line_errors():
    try:
        yield
    except ToolkitError as exc:
        fail(exc)


def step(title: str):
    @contextlib.contextmanager
    def run():
        started = time.perf_counter()
        with console.status(f"{title}..."):
            yield
        console.print(f"[green]✓[/] {escape(title)} [dim]({time.perf_counter() - started:.1f} s)[/]")
    return run()


def parse_device(value: str):
    from toolkit.settings import Device

    try:
        return Device(value)
    except ValueError:
        raise ConfigError(f"--device must be one of: {', '.join(d.value for d in Device)} (got {value})") from None


def parse_precision_target(precision: str, target: str):
    """(Precision, Target) from the flags; ConfigError naming the valid choices."""
    from toolkit.settings import Precision, Target

    try:
        return Precision(precision), Target(target)
    except ValueError:
        raise ConfigError(f"--precision must be one of: {', '.join(p.value for p in Precision)}; --target one of: "
                          f"{', '.join(t.value for t in Target)} (got {precision}, {target})") from None


def int_list(value: str | None, option: str) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        fail(ConfigError(f"{option} expects comma-separated integers like 64,128,256, got '{value}'"))
        raise


def stdout_console() -> Console:
    """Tables as wide as the terminal, or as ``COLUMNS`` says; piped without ``COLUMNS``, at full width (Rich
    would cut them at 80 columns)."""
    sized = sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit()
    return Console(width=None if sized else 250)


