"""The one domain exception tree of kleinserve.

Every error a user can cause or meet is a :class:`KleinserveError` with a stable machine ``code``
and a human ``message``. No HTTP status lives here: the HTTP layer maps these classes to statuses
and to each dialect's error body in one table, and the CLI prints ``message`` and exits non-zero.

::

    KleinserveError
    ├── InvalidRequestError                 the caller asked for something we cannot do
    │   ├── InvalidParameterError           a field is missing, of the wrong type or out of range
    │   ├── InvalidImageError               a reference image cannot be fetched, decoded or accepted
    │   ├── UnknownModelError               the model id names no known or served variant
    │   ├── NotFoundError                   a job, file or other resource does not exist
    │   ├── ContentPolicyError              the safety checker refused the output (policy "refuse")
    │   ├── PayloadTooLargeError            the request body is over the configured cap
    │   ├── UnsupportedMediaTypeError       the body's Content-Type is not one the route reads
    │   └── RequestTimeoutError             the request body did not arrive in time
    ├── AuthenticationError                 no API key, or one that is unknown or revoked
    ├── ForbiddenError                      refused whoever asks (a browser's cross-site write)
    ├── InsufficientCreditsError            the key's credits do not cover the request
    ├── RateLimitedError                    over the key's rate or concurrency limit (retry later)
    ├── WeightsUnavailableError             weights cannot be found, downloaded or loaded
    ├── GenerationCancelledError            the job was cancelled between two steps
    ├── ResourceExhaustedError              the device ran out of memory
    └── ServiceUnavailableError             not ready yet, or the queue is full
"""

from __future__ import annotations


class KleinserveError(Exception):
    """Base of every error kleinserve raises on purpose."""

    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(KleinserveError):
    """The request cannot be served as asked; the caller must change it."""

    code = "invalid_request"


class InvalidParameterError(InvalidRequestError):
    """A request field is missing, malformed or out of its documented range."""

    code = "invalid_parameter"

    def __init__(self, field: str, message: str, *, source: str = "body") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.detail = message  # the message without the field, for renaming the field (api/dialects/base.py)
        # Where the field came from (body, query, path, header): FastAPI-shaped errors (BFL, fal) put
        # it first in their ``loc``.
        self.source = source


class InvalidImageError(InvalidRequestError):
    """A reference image was unreadable, too large, of a refused kind, or could not be fetched."""

    code = "invalid_image"

    def __init__(self, index: int | None, message: str, *, field: str = "images") -> None:
        where = f"{field}[{index}]" if index is not None else field
        super().__init__(f"{where}: {message}")
        self.index = index
        self.field = field


class UnknownModelError(InvalidRequestError):
    """The model id matches no variant (or no variant this server serves)."""

    code = "unknown_model"

    def __init__(self, model: str, known: list[str]) -> None:
        super().__init__(f"unknown model {model!r}; known models: {', '.join(known)}")
        self.model = model
        self.known = known


class NotFoundError(InvalidRequestError):
    """A job, file or other named resource does not exist (or is not the caller's)."""

    code = "not_found"


class ContentPolicyError(InvalidRequestError):
    """The safety checker flagged an output and the operator's policy is to refuse it."""

    code = "content_policy_violation"  # OpenAI's code for the same refusal


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts."""

    code = "payload_too_large"


class UnsupportedMediaTypeError(InvalidRequestError):
    """The body is not in a media type the route accepts (JSON routes need application/json)."""

    code = "unsupported_media_type"


class RequestTimeoutError(InvalidRequestError):
    """The client took longer than allowed to send its request."""

    code = "request_timeout"


class ForbiddenError(KleinserveError):
    """The request is refused whatever key it carries."""

    code = "forbidden"


class AuthenticationError(KleinserveError):
    """The request carries no valid API key."""

    code = "unauthenticated"


class InsufficientCreditsError(KleinserveError):
    """The API key has too few credits left for this request."""

    code = "insufficient_credits"


class RateLimitedError(KleinserveError):
    """The API key is over one of its limits; ``retry_after`` seconds from now it will not be."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WeightsUnavailableError(KleinserveError):
    """Model weights could not be resolved, downloaded or loaded."""

    code = "weights_unavailable"


class GenerationCancelledError(KleinserveError):
    """Generation stopped because its job was cancelled."""

    code = "cancelled"

    def __init__(self, message: str = "generation was cancelled") -> None:
        super().__init__(message)


class ResourceExhaustedError(KleinserveError):
    """The device ran out of memory for this request."""

    code = "out_of_memory"


class ServiceUnavailableError(KleinserveError):
    """The service cannot take the work now; retrying later may succeed."""

    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
