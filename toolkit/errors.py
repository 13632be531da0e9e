"""The toolkit's one error tree.

::

    ToolkitError                          500
    ├── ConfigError                       CLI exit 2; server refuses to start
    │   └── UnsupportedArchitectureError
    ├── ExportError
    │   └── ParityError                   carries the missed figure per output (min cosine, or max abs difference)
    ├── RequestError                      400 invalid_request_error
    │   ├── InputTooLongError
    │   ├── UnsupportedDimensionError     param="dimensions"
    │   ├── AuthenticationError           401
    │   ├── PayloadTooLargeError          413
    │   ├── UnsupportedMediaTypeError     415
    │   ├── ModelNotFoundError            404
    │   └── ObjectNotFoundError           404 (a file or batch of the Batch API)
    ├── OverloadedError                   429
    ├── BulkError (toolkit.bulk)          a row `toolkit embed` cannot embed, or an output it cannot resume
    └── BackendError                      500
        └── NotReadyError                 503 (also: shutting down past the grace period)

Subclasses override class attributes only; each API renders the same
exception in its own shape (see ``toolkit.server``).
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackendError",
    "ConfigError",
    "ExportError",
    "InputTooLongError",
    "ModelKindError",
    "ModelNotFoundError",
    "NotReadyError",
    "ObjectNotFoundError",
    "OverloadedError",
    "ParityError",
    "PayloadTooLargeError",
    "RequestError",
    "ToolkitError",
    "UnsupportedArchitectureError",
    "UnsupportedDimensionError",
    "UnsupportedMediaTypeError",
]


class ToolkitError(Exception):
    """Base of every error the toolkit raises on purpose."""

    status_code: int = 500
    error_type: str = "internal_error"
    param: str | None = None
    exit_code: int = 1

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param


class ConfigError(ToolkitError):
    """A bad model, artifact, card or option: the CLI exits 2, the server does not start."""

    exit_code = 2


class UnsupportedArchitectureError(ConfigError):
    """``config.model_type`` is not in the export registry."""


class ExportError(ToolkitError):
    """The export pipeline failed."""


class ParityError(ExportError):
    """The exported graph does not match the PyTorch reference.

    ``report`` maps each output that missed to its figure: the min cosine similarity, or for scores
    (cross-encoders) the max absolute difference.
    """

    def __init__(self, message: str, report: dict[str, float]) -> None:
        super().__init__(message)
        self.report = report


class RequestError(ToolkitError):
    """The caller's input is invalid: 400 ``invalid_request_error``."""

    status_code = 400
    error_type = "invalid_request_error"


class InputTooLongError(RequestError):
    """An input has more tokens than the model accepts and truncation is off."""

    param = "input"


class ModelKindError(RequestError):
    """TEI's answer to a route the served model's kind does not have (/predict on an embedding model, /rerank on
    a classifier): 424, ``Backend`` in TEI's shape."""

    status_code = 424


class UnsupportedDimensionError(RequestError):
    """``dimensions`` is not one the artifact can produce."""

    param = "dimensions"


class AuthenticationError(RequestError):
    """Missing or wrong API key."""

    status_code = 401
    error_type = "authentication_error"


class PayloadTooLargeError(RequestError):
    """The request body is over the server's payload limit."""

    status_code = 413


class UnsupportedMediaTypeError(RequestError):
    """The body's Content-Type is not JSON."""

    status_code = 415


class RouteNotFoundError(RequestError):
    """A path this port does not serve (the metrics port serves /metrics only)."""

    status_code = 404
    error_type = "not_found_error"


class ModelNotFoundError(RequestError):
    """The request names a model the server does not serve."""

    status_code = 404
    error_type = "not_found_error"
    param = "model"


class ObjectNotFoundError(RequestError):
    """A file or batch id the server does not hold (the Batch API)."""

    status_code = 404
    error_type = "not_found_error"


class OverloadedError(ToolkitError):
    """The queue is full: 429 with ``Retry-After``."""

    status_code = 429
    error_type = "rate_limit_error"
    retry_after_s: int = 1


class BackendError(ToolkitError):
    """onnxruntime failed while running a batch."""

    status_code = 500
    error_type = "internal_error"


class NotReadyError(BackendError):
    """The model is loading or its backend stopped working."""

    status_code = 503
    error_type = "service_unavailable"
