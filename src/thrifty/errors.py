"""One exception tree; each error knows its HTTP status and OpenAI error shape.

Translation to HTTP happens once, in the server; the CLI prints `message`.
"""

from __future__ import annotations

from typing import Any


class ThriftyError(Exception):
    """Base of every error thrifty raises on purpose."""

    status: int = 500
    error_type: str = "server_error"
    code: str | None = None
    retry_after_s: float | None = None  # sent as Retry-After when set
    # Sent as x-should-retry (which the OpenAI SDKs obey over their own retry policy) when set.
    should_retry: bool | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class ConfigError(ThriftyError):
    """Settings are invalid; raised at start, never per request."""

    status = 500
    error_type = "configuration_error"


class InvalidData(ThriftyError):
    """An input file (labelled routing data, a benchmark set) is missing or malformed; CLI only."""

    status = 400
    error_type = "invalid_request_error"


class InvalidRequest(ThriftyError):
    status = 400
    error_type = "invalid_request_error"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(ThriftyError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ThriftyError):
    status = 403
    error_type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(ThriftyError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class UnpricedModel(ThriftyError):
    """Only raised when settings ask to reject models without a known price."""

    status = 400
    error_type = "invalid_request_error"
    code = "model_not_priced"


class ProviderError(ThriftyError):
    """The provider answered with an error; its status and message are passed on."""

    error_type = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int,
        provider: str,
        body: dict[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, code="upstream_error")
        self.retry_after_s = retry_after_s
        self.status = status
        self.provider = provider
        self.body = body

    def to_openai(self) -> dict[str, Any]:
        upstream = (self.body or {}).get("error") if isinstance(self.body, dict) else None
        if isinstance(upstream, dict) and "message" in upstream:
            # Keep the provider's own type/code so SDK clients can branch on them.
            return {
                "error": {
                    "message": f"{self.provider}: {upstream.get('message')}",
                    "type": upstream.get("type") or self.error_type,
                    "param": upstream.get("param"),
                    "code": upstream.get("code") or self.code,
                }
            }
        return super().to_openai()


class ProviderUnreachable(ThriftyError):
    status = 502
    error_type = "upstream_error"
    code = "provider_unreachable"


class ProviderKeyMissing(ThriftyError):
    """The provider's API key variable was not set at start: its calls would only get a 401."""

    status = 502
    error_type = "upstream_error"
    code = "provider_key_missing"


class ProviderTimeout(ThriftyError):
    status = 504
    error_type = "upstream_error"
    code = "provider_timeout"


class ProviderProtocolError(ThriftyError):
    """The provider's answer could not be understood."""

    status = 502
    error_type = "upstream_error"
    code = "provider_bad_response"


class BatchUnresolved(ThriftyError):
    """After a crash, the provider cannot tell yet which of its batches is the one sent (several
    of the same size were created then): nothing is sent again until it can."""

    status = 503
    error_type = "api_error"
    code = "batch_unresolved"


class BudgetExceeded(ThriftyError):
    """A hard budget would be overrun by this request's worst-case cost.

    Retry-After is the time until the budget's window resets. An SDK retrying at once would only be
    refused again, so `x-should-retry: false` tells the OpenAI SDKs not to, unless the reset is
    close enough (a minute) that waiting for it and retrying is what the client wants."""

    status = 429
    error_type = "insufficient_quota"
    code = "budget_exceeded"

    def __init__(self, message: str, *, resets_in_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(0.0, resets_in_s)
        self.should_retry = resets_in_s <= 60


class SharedStateUnavailable(ThriftyError):
    """A store shared by the replicas (Redis, PostgreSQL) did not answer, and the settings say to
    refuse rather than guess (fault mode `fail_closed`)."""

    status = 503
    error_type = "server_error"
    code = "dependency_unavailable"


class RequestTooExpensive(ThriftyError):
    """The request's worst-case cost is above the route's per-request cap; retrying will not help."""

    status = 400
    error_type = "invalid_request_error"
    code = "request_cost_cap_exceeded"


class IdempotencyConflict(ThriftyError):
    """The same Idempotency-Key was sent with a different request body."""

    status = 422
    error_type = "invalid_request_error"
    code = "idempotency_key_reused"


class AllAttemptsFailed(ThriftyError):
    """Every target of a request (retries and fallbacks) failed; carries the last status."""

    error_type = "upstream_error"
    code = "all_attempts_failed"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class RateLimited(ThriftyError):
    status = 429
    error_type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SessionStepLimit(ThriftyError):
    status = 429
    error_type = "invalid_request_error"
    code = "session_step_limit"


class IdempotentRequestUnfinished(ThriftyError):
    """The first request with this Idempotency-Key ended without a result (e.g. a cut stream)."""

    status = 409
    error_type = "invalid_request_error"
    code = "idempotent_request_unfinished"


class IdempotentRequestInProgress(ThriftyError):
    """The key's first request was still running when its gateway stopped (or runs on another
    replica): answering now could generate and charge twice, so the client retries later."""

    status = 409
    error_type = "invalid_request_error"
    code = "idempotent_request_in_progress"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, param="Idempotency-Key")
        self.retry_after_s = retry_after_s


class IdempotencyCapacity(ThriftyError):
    """As many idempotent requests are running as `idempotency.max_entries` allows; a running key is
    never dropped to make room (a repeat of it would generate twice), so a new one waits."""

    status = 503
    error_type = "server_error"
    code = "idempotency_capacity"
    retry_after_s = 1.0


class CircuitOpen(ThriftyError):
    """A target skipped because its circuit breaker is open."""

    status = 503
    error_type = "upstream_error"
    code = "circuit_open"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = None if retry_after_s is None else max(0.0, retry_after_s)
