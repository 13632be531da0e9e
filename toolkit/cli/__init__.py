"""The ``toolkit`` command: export, inspect, cards, serve, embed, bench (a module per command).

``app`` holds the Typer app and what every command shares; each command module registers itself on it.
"""

import importlib

from toolkit.cli.app import app

for _command in ("export", "inspect", "serve", "embed", "bench"):  # each registers its command(s), in --help's order
    importlib.import_module(f"toolkit.cli.{_command}")

__all__ = ["app", "main"]


def main() -> None:
    app()
