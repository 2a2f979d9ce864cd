"""The one place where daemon errors become gRPC statuses.

The stable code travels in trailing metadata, so clients in any language can
branch on it without parsing messages:

- ``kynara-error-code``: a code from the ErrorCode catalogue
- ``kynara-error-field``: the request field at fault, when there is one
"""

from __future__ import annotations

import grpc
from kynara.v1 import decision_pb2 as pb

from kynara_sidecar.errors import ErrorCode, KynaraError, RequestError, ServiceError

__all__ = [
    "ERROR_CODE_KEY",
    "ERROR_FIELD_KEY",
    "abort_with",
    "error_to_proto",
    "status_for",
]

ERROR_CODE_KEY = "kynara-error-code"
ERROR_FIELD_KEY = "kynara-error-field"


# gRPC clients drop a response whose metadata passes 8 KiB (their default
# soft limit), and a field path can hold a caller's key of any length.
MAX_METADATA_TEXT = 1024


def _bounded(text: str) -> str:
    if len(text) <= MAX_METADATA_TEXT:
        return text
    return text[: MAX_METADATA_TEXT - 3] + "..."


def _printable_ascii(text: str) -> str:
    """gRPC metadata values are printable ASCII: escape everything else.

    A field path can hold a caller's map key, such as ``context['région']``,
    which travels as ``context['r\\xe9gion']``.
    """
    if text.isascii() and text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def status_for(error: KynaraError) -> tuple[grpc.StatusCode, str, str]:
    """Return (status, code, field) for an error; unknown ones are internal."""
    if isinstance(error, RequestError | ServiceError):
        return error.status, str(error.code), error.field
    return grpc.StatusCode.INTERNAL, str(ErrorCode.INTERNAL), ""


def error_to_proto(error: KynaraError) -> pb.Error:
    _, code, field = status_for(error)
    return pb.Error(code=code, message=str(error), field=field)


async def abort_with(context: grpc.aio.ServicerContext, error: KynaraError) -> None:
    """Abort the call with the error's status, code and field. Never returns."""
    status, code, field = status_for(error)
    metadata = [(ERROR_CODE_KEY, code)]
    if field:
        metadata.append((ERROR_FIELD_KEY, _bounded(_printable_ascii(field))))
    context.set_trailing_metadata(tuple(metadata))
    await context.abort(status, _bounded(str(error)))
