"""Typed errors raised by library code.

Only the CLI (`chatbot.cli`) and the HTTP API (`chatbot.api`) turn these into
exit codes and HTTP statuses; library code never prints or exits.
"""

from __future__ import annotations


class ChatbotError(Exception):
    """Base class of every error this project raises on purpose."""

    #: HTTP status the API answers with for this error.
    http_status: int = 500
    #: OpenAI-style error ``type`` string.
    error_type: str = "server_error"


class ConfigError(ChatbotError):
    """A setting has a bad value; the message names the field and the value."""

    http_status = 500
    error_type = "config_error"


class InvalidInputError(ChatbotError):
    """A request (customer message, API body) cannot be processed as given."""

    http_status = 400
    error_type = "invalid_request_error"


class NotFoundError(ChatbotError):
    """A referenced object (conversation, document, index version) does not exist."""

    http_status = 404
    error_type = "not_found_error"


class ModelAssetError(ChatbotError):
    """An embedded model could not be fetched, converted or loaded."""

    error_type = "model_asset_error"


class RetrievalIndexError(ChatbotError):
    """The retrieval index is missing, corrupt or inconsistent with its manifest."""

    error_type = "index_error"


class RetrievalError(ChatbotError, ValueError):
    """A retrieval argument, option or document is invalid (a bad ``top_k``, mode, vector shape, unreadable file);
    the message names the field and the value. A ``ValueError`` too, for callers that catch that."""

    http_status = 400
    error_type = "invalid_request_error"


class DocumentNotFoundError(ChatbotError, FileNotFoundError):
    """A document path given to ingest does not exist. A ``FileNotFoundError`` too."""

    http_status = 404
    error_type = "not_found_error"


class EngineError(ChatbotError):
    """The generation engine failed to start or to serve a request."""

    error_type = "engine_error"


class StoreError(ChatbotError):
    """The conversation log store could not read or write."""

    error_type = "store_error"



class TooBusyError(ChatbotError):
    """Every running and queued place is taken; the client should retry after ``retry_after_s``."""

    http_status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(ChatbotError):
    """A reply took longer than the per-request timeout and was aborted."""

    http_status = 504
    error_type = "timeout_error"


class DataError(ChatbotError, ValueError):
    """A training or evaluation dataset is malformed; the message names the sample and field (still a
    ``ValueError`` for callers that caught the readers' older errors)."""

    http_status = 400
    error_type = "data_error"


class TooLittleDataError(DataError):
    """Well-formed training data, but too little to learn from (too few dialogues, or no reply token).

    Attributes:
        examples: dialogues that could be used.
        minimum: dialogues needed.
    """

    http_status = 422
    error_type = "too_little_data"

    def __init__(self, message: str, examples: int = 0, minimum: int = 0) -> None:
        super().__init__(message)
        self.examples, self.minimum = examples, minimum


class AdapterError(ChatbotError):
    """A fine-tuned adapter is missing, malformed, or refused by the promotion gate."""

    http_status = 409
    error_type = "adapter_error"


class AuthError(ChatbotError):
    """Not logged in, a bad user name or password, or an expired session."""

    http_status = 401
    error_type = "authentication_error"


class PermissionDeniedError(ChatbotError):
    """Logged in, but the user's role may not do this (e.g. staff starting training)."""

    http_status = 403
    error_type = "permission_error"
