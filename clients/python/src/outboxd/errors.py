"""Typed exceptions for outboxd's gRPC status codes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    """A field of the request at fault, e.g. `events[3].topic`, and why."""

    field: str
    description: str


class OutboxError(Exception):
    """An outboxd call failed. `code` is the gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        #: The fields at fault (`google.rpc.BadRequest` details), if any.
        self.violations: tuple[FieldViolation, ...] = tuple(violations)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidEvent(OutboxError):
    """INVALID_ARGUMENT: the request was refused before anything was stored;
    `violations` names each field at fault."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.violations]


class AlreadyExists(OutboxError):
    """ALREADY_EXISTS: this (producer, transaction id, sequence) was stored with
    another body, or a caller-chosen event id is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(OutboxError):
    """FAILED_PRECONDITION: e.g. Commit after an abort or expiry, Abort after a
    commit, an append to a resolved transaction, or a postgres_xid token that no
    configured cluster can resolve."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(OutboxError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(OutboxError):
    """UNAUTHENTICATED: no or an unknown bearer token / client certificate."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(OutboxError):
    """PERMISSION_DENIED: this identity may not use that producer or topic."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(OutboxError):
    """RESOURCE_EXHAUSTED: a limit (request size, open watches…)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(OutboxError):
    """UNAVAILABLE: outboxd or its store cannot be reached. Nothing is known to be
    stored: do not commit the business transaction on the strength of it."""

    code = grpc.StatusCode.UNAVAILABLE


class TlsError(Unavailable):
    """UNAVAILABLE at the TLS layer: the connection's TLS failed, so the call
    never reached outboxd. Either the client does not trust outboxd's
    certificate (not signed by the root certificates given, or not naming the
    target), or outboxd refused the client certificate (not signed by its
    client CA, or not valid now). Nothing was stored; it persists until the
    certificates or the configuration change."""


class DeadlineExceeded(OutboxError):
    """DEADLINE_EXCEEDED: no answer in time; the request may or may not have been
    stored (an append retried with the same token settles it)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(OutboxError):
    code = grpc.StatusCode.CANCELLED


class Internal(OutboxError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[OutboxError]] = {
    cls.code: cls
    for cls in (
        InvalidEvent,
        AlreadyExists,
        FailedPrecondition,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}

_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code of a `google.rpc.Code` number."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def error_for(
    code: grpc.StatusCode, message: str, violations: Sequence[FieldViolation] = ()
) -> OutboxError:
    cls = _BY_CODE.get(code, OutboxError)
    return cls(message, code=code, violations=violations)


def _violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
    """The `google.rpc.BadRequest` field violations in the trailers, if any."""
    violations: list[FieldViolation] = []
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                )
    return violations


#: How gRPC core describes a failure of the connection's TLS (its transport
#: security interface, TSI), e.g. "Tls handshake failed (TSI_PROTOCOL_FAILURE):
#: … CERTIFICATE_VERIFY_FAILED" for an untrusted server certificate, or
#: "Unwrap failed (TSI_DATA_CORRUPTED)" when the server's TLS alert refusing
#: the client certificate arrives after the client's side of a TLS 1.3
#: handshake completed.
_TLS_FAILURE_MARKERS = ("handshake failed", "tsi_")


def from_rpc_error(error: grpc.aio.AioRpcError) -> OutboxError:
    """The typed exception of a failed call."""
    details = error.details() or ""
    if error.code() == grpc.StatusCode.UNAVAILABLE and any(
        marker in details.lower() for marker in _TLS_FAILURE_MARKERS
    ):
        return TlsError(
            "TLS with outboxd failed: the client does not trust outboxd's certificate, "
            f"or outboxd refused the client certificate ({details})",
            code=grpc.StatusCode.UNAVAILABLE,
        )
    return error_for(error.code(), details, _violations(error))
