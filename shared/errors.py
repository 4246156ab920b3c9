"""Domain errors: raised by services, turned into the contract's JSON by one middleware."""

from __future__ import annotations


class HeraldError(Exception):
    """Base of every error a client may see; ``status`` and ``code`` form the answer."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        return {}


class ValidationError(HeraldError):
    status = 422
    code = "validation_error"


class Unauthorized(HeraldError):
    status = 401
    code = "unauthorized"


class Forbidden(HeraldError):
    status = 403
    code = "forbidden"


class NotFound(HeraldError):
    status = 404
    code = "not_found"


class MethodNotAllowed(HeraldError):
    status = 405
    code = "method_not_allowed"


class Conflict(HeraldError):
    status = 409
    code = "conflict"


class PayloadTooLarge(HeraldError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(HeraldError):
    status = 415
    code = "unsupported_media_type"


class TooManyRequests(HeraldError):
    status = 429
    code = "too_many_requests"


class RetryLater(HeraldError):
    """An answer that carries ``Retry-After`` (429/503)."""

    status = 503
    code = "unavailable"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: int = 1, status: int = 503
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, int(retry_after))
        self.status = status

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class BackendUnavailable(RetryLater):
    """PostgreSQL (or a Redis the request cannot do without) did not answer within
    HERALD_BACKEND_TIMEOUT_S, or refused the connection: the request was fine."""

    code = "service_unavailable"

    def __init__(
        self,
        message: str = "a backing service is unavailable; retry shortly",
        *,
        retry_after: int = 5,
    ) -> None:
        super().__init__(message, retry_after=retry_after)


class InsufficientStorage(HeraldError):
    """The upload directory is full, over quota, read-only or not writable."""

    status = 507
    code = "insufficient_storage"


class CronDisabled(HeraldError):
    """The cron routes without a configured ``CRON_SECRET``."""

    status = 503
    code = "cron_disabled"


# The code of each status when the answer is not one of ours (aiohttp's own 404, 405,
# 413...): the classes above carry it, the error middleware reads it from here.
STATUS_CODES: dict[int, str] = {
    cls.status: cls.code
    for cls in (
        HeraldError,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        ValidationError,
        TooManyRequests,
        RetryLater,
        InsufficientStorage,
    )
}


def code_for_status(status: int) -> str:
    """The contract's error code for an HTTP status; ``error`` for one it does not name."""
    return STATUS_CODES.get(status, "error")
