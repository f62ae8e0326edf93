"""Typed errors: each names what went wrong, the field at fault and the HTTP status it maps to.

Nothing here imports KServe or FastAPI; the HTTP layer turns these into responses in one place.
"""

from __future__ import annotations


class PredictorError(Exception):
    """Base of every error a client can be told about."""

    status: int = 500
    error_type: str = "server_error"

    @property
    def outcome(self) -> str:
        """The ``outcome`` label of ``falcon_requests_total`` a request that ends with this error counts under."""
        return self.error_type

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidRequest(PredictorError):
    """A field has the wrong type, is out of range, or does not fit with another field."""

    status = 400
    error_type = "invalid_request"


class MissingPrompt(InvalidRequest):
    """No prompt (or an empty one) and no messages; the message starts with the words the Falcon /chat clients
    know."""

    error_type = "missing_prompt"

    def __init__(self) -> None:
        super().__init__('Text generation parameter prompt required: send "prompt" (a non-empty string) or '
                         '"messages" (a list of {"role", "content"})', param="prompt")


class UnknownParameter(InvalidRequest):
    error_type = "unknown_parameter"


class Forbidden(PredictorError):
    """A request the server understood and will not carry out (a path outside what it may read)."""

    status = 403
    error_type = "forbidden"


class NotFound(PredictorError):
    status = 404
    error_type = "not_found"


class ModelNotFound(NotFound):
    error_type = "model_not_found"


class ContextLengthExceeded(PredictorError):
    """The prompt and the tokens asked for do not fit in the model's context."""

    status = 422
    error_type = "context_length_exceeded"


class BodyTooLarge(PredictorError):
    status = 413
    error_type = "body_too_large"


class HeadersTooLarge(PredictorError):
    """The request line and headers are larger than the server's limit: answered, then the connection closed."""

    status = 431
    error_type = "headers_too_large"

    def __init__(self, message: str, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Connection", "close")


class Unauthorized(PredictorError):
    status = 401
    error_type = "unauthorized"

    def __init__(self, message: str, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("WWW-Authenticate", "Bearer")


class Overloaded(PredictorError):
    """The queue of waiting requests is full: the client should retry later."""

    status = 429
    error_type = "overloaded"


class NotReady(PredictorError):
    status = 503
    error_type = "not_ready"


class Draining(PredictorError):
    """The server is shutting down and takes no new work."""

    status = 503
    error_type = "draining"


class UnsupportedOption(PredictorError):
    """A well-formed option this model cannot apply (say, structured output with a tokenizer llguidance cannot
    read): found when the request was admitted, it fails that request alone."""

    status = 422
    error_type = "unsupported_option"


class GenerationFailed(PredictorError):
    """Work on this request raised (out of memory, a device fault, a bug) at ``stage``: this request failed, the
    server goes on. The error type names the stage: ``generation_failed`` for the forward step, else
    ``admission_failed``, ``sampling_failed``, ``retirement_failed``, ``detokenization_failed`` or
    ``streaming_failed``."""

    status = 500

    def __init__(self, message: str, *, stage: str = "generation", **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.stage = stage
        self.error_type = f"{stage}_failed"

    @property
    def outcome(self) -> str:
        return "failed"


class EngineStopped(PredictorError):
    """A generation worker died or made no progress: every request waiting or running ends with this, and the
    probes tell Kubernetes to restart the pod."""

    status = 503
    error_type = "engine_stopped"

    @property
    def outcome(self) -> str:
        return "failed"


class RequestTimeout(PredictorError):
    """The request was not answered within ``--request_timeout`` (it waited in the queue all that time, or the
    worker running it stopped answering)."""

    status = 504
    error_type = "request_timeout"


def error_body(exc: PredictorError) -> dict[str, str | None]:
    """The JSON body of every error answer but the OpenAI routes': ``detail`` for the Falcon /chat clients,
    ``error``/``error_type`` as text-generation-inference has them."""
    return {"detail": exc.message, "error": exc.message, "error_type": exc.error_type, "param": exc.param}
