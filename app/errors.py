"""Domain errors. Each carries the HTTP status and error code the API renders it with."""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    """Base of every error the service raises on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def details(self) -> Any:
        """What the error body carries besides the message, if anything."""
        return None


class InvalidInputError(AppError, ValueError):
    """Input a service cannot accept, in words safe to show the client (422). Any other
    ValueError is a fault, answered with the generic 500."""

    status_code = 422
    code = "invalid_input"


class PayloadTooLargeError(AppError):
    status_code = 413
    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")


class RequestTimeoutError(AppError):
    status_code = 408
    code = "request_timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s")


class InsufficientCreditsError(AppError):
    status_code = 402
    code = "insufficient_credits"

    def __init__(self, user_id: str, available: int, required: int) -> None:
        super().__init__(f"user {user_id!r} has {available} credit(s); {required} required")
        self.user_id = user_id
        self.available = available
        self.required = required

    @property
    def details(self) -> Any:
        return {"available": self.available, "required": self.required}


class IdempotencyKeyReusedError(AppError):
    """An Idempotency-Key sent again with another request than its first use's."""

    status_code = 422
    code = "idempotency_key_reused"

    def __init__(self, first_use: str) -> None:
        super().__init__(
            f"this Idempotency-Key was first used for another request (a {first_use}); "
            "a new request needs a new key"
        )


class StorageFullError(AppError):
    """The in-memory store holds as many users as it may (MEMORY_STORE_MAX_USERS)."""

    status_code = 507
    code = "storage_full"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the in-memory store holds its maximum of {limit} users (MEMORY_STORE_MAX_USERS); "
            "users it holds are still served, new ones need the database store"
        )


class ConsentNotFoundError(AppError):
    status_code = 404
    code = "consent_not_found"

    def __init__(self, user_id: str) -> None:
        super().__init__(f"no consent recorded for user {user_id!r}")
        self.user_id = user_id


class ConsentRequiredError(AppError):
    status_code = 403
    code = "consent_required"

    def __init__(self, user_id: str) -> None:
        super().__init__(f"user {user_id!r} has not accepted the terms")
        self.user_id = user_id


class TermsOutdatedError(AppError):
    status_code = 403
    code = "terms_outdated"

    def __init__(self, user_id: str, current: str) -> None:
        super().__init__(
            f"user {user_id!r} accepted an earlier version of the terms; version {current} "
            "must be accepted"
        )
        self.user_id = user_id


class UserNotFoundError(AppError):
    status_code = 404
    code = "user_not_found"

    def __init__(self, user_id: str) -> None:
        super().__init__(f"no data is held for user {user_id!r}")


class ErasureNotConfiguredError(AppError):
    """Erasure needs ERASURE_KEY: without it there is no pseudonym to keep the ledger under,
    and a plain hash of a guessable id would be no pseudonym at all."""

    status_code = 501
    code = "erasure_not_configured"

    def __init__(self) -> None:
        super().__init__("erasure is not configured on this service (ERASURE_KEY is unset)")


class DeadLetterNotFoundError(AppError):
    status_code = 404
    code = "dead_letter_not_found"

    def __init__(self, seq: int) -> None:
        super().__init__(f"the outage journal holds no dead letter {seq}")


class StorageUnavailableError(AppError):
    """The store cannot serve right now; clients should retry after `retry_after` seconds."""

    status_code = 503
    code = "storage_unavailable"

    def __init__(self, message: str = "storage is unavailable", retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JournalPendingError(AppError):
    """SPEC §9 revision 3: the primary does not change while changes made during an
    outage wait in the journal; they would land in a store that no longer serves."""

    status_code = 409
    code = "journal_pending"

    def __init__(self, depth: int) -> None:
        super().__init__(
            f"{depth} change(s) made during an outage wait to be replayed into the database; "
            "the storage flag was left as it was (retry once /health/ready shows none)"
        )
        self.depth = depth

    @property
    def details(self) -> Any:
        return {"journal_depth": self.depth}


class AnswerFailedError(AppError):
    status_code = 502
    code = "answer_failed"


class AdminForbiddenError(AppError):
    status_code = 403
    code = "forbidden"


class ForbiddenError(AppError):
    """The caller is known but may not do this (SPEC §8)."""

    status_code = 403
    code = "forbidden"
