"""Request-level checks shared by every route: validated choices and size limits."""

from __future__ import annotations

from collections.abc import Sequence

from toolkit.errors import RequestError
from toolkit.settings import ServerOptions

__all__ = ["PRIORITY_RANGE", "check_choice", "check_limits", "check_priority", "tei_truncation"]

PRIORITY_RANGE = (-1000, 1000)  # lower runs first; 0 is the default


def check_choice(value: str, valid: Sequence[str], param: str) -> str:
    if value not in valid:
        raise RequestError(f"{param} '{value}' is not one of: {', '.join(valid)}", param=param)
    return value


def check_limits(n_inputs: int, options: ServerOptions, *, param: str = "input") -> None:
    if n_inputs == 0:
        raise RequestError(f"{param} must not be empty", param=param)
    if n_inputs > options.max_client_batch_size:
        raise RequestError(f"{n_inputs} inputs in one request; the limit is {options.max_client_batch_size}", param=param)



def check_priority(priority: int, options: ServerOptions) -> int:
    """vLLM's ``priority`` (lower runs first), bounded; negative only where the operator allows it."""
    lo, hi = PRIORITY_RANGE
    if not lo <= priority <= hi:
        raise RequestError(f"priority must be between {lo} and {hi}, got {priority}", param="priority")
    if priority < 0 and not options.allow_priority_boost:
        raise RequestError("priority below 0 (ahead of other requests) is not allowed on this server "
                           "(the operator can allow it with --allow-priority-boost)", param="priority")
    return priority


def tei_truncation(truncate: bool | None, direction: str) -> dict:
    """TEI's ``truncate`` (not given: the server's default, too long an error unless ``--auto-truncate``;
    an explicit false refuses truncation even then) and ``truncation_direction`` (Left / Right)."""
    side = direction.lower()
    if side not in ("left", "right"):
        raise RequestError(f"truncation_direction '{direction}' is not one of: Left, Right", param="truncation_direction")
    return {"truncate_prompt_tokens": {True: -1, False: False, None: None}[truncate], "truncation_side": side}
