"""Request-level checks shared by every route: validated choices and size limits."""

from __future__ import annotations

from collections.abc import Sequence

from toolkit.errors import RequestError
from toolkit.settings import ServerOptions

__all__ = ["check_choice", "check_limits"]


def check_choice(value: str, valid: Sequence[str], param: str) -> str:
    if value not in valid:
        raise RequestError(f"{param} '{value}' is not one of: {', '.join(valid)}", param=param)
    return value


def check_limits(n_inputs: int, options: ServerOptions, *, param: str = "input") -> None:
    if n_inputs == 0:
        raise RequestError(f"{param} must not be empty", param=param)
    if n_inputs > options.max_client_batch_size:
        raise RequestError(f"{n_inputs} inputs in one request; the limit is {options.max_client_batch_size}", param=param)

