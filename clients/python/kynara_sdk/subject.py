"""Who a call acts for: ``acting_for`` and the per-call override.

The subject lives in a ``contextvars.ContextVar``, not a global, so each
asyncio task and each thread sees its own: two tasks serving two users never
see each other's subject. A new thread starts with no subject (Python does
not copy contexts into threads); ``asyncio.to_thread`` and
``contextvars.copy_context().run`` carry it over.

``acting_for`` blocks nest; the innermost wins whole (it replaces, it does not
append to, the outer subject) and the outer one is back on exit, even when
the block raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence

__all__ = ["Subject", "acting_for", "current_subject", "resolve_subject"]


@dataclasses.dataclass(frozen=True, slots=True)
class Subject:
    """The principals a request acts for.

    ``chain`` is the asserted delegation chain (user first, then any
    intermediate agents; the daemon appends its own agent). ``token`` is a
    delegation token instead. At most one of them is set.
    """

    chain: tuple[str, ...] = ()
    token: str = ""


_current: contextvars.ContextVar[Subject | None] = contextvars.ContextVar(
    "kynara_subject", default=None
)


@contextlib.contextmanager
def acting_for(
    *,
    user: str | None = None,
    token: str | None = None,
    chain: Sequence[str] | None = None,
) -> Iterator[Subject]:
    """Make every decision inside the block act for this subject.

    Args:
        user: a user id; the same as ``chain=[user]``.
        token: a delegation token (JWT) naming the user and any agents.
        chain: the asserted chain, user first, then intermediate agents.

    Returns:
        A context manager yielding the ``Subject`` now current.

    Raises:
        ValueError: not exactly one of ``user``, ``token``, ``chain`` is
            given, or one is empty.
        TypeError: a value is not a str (or, for ``chain``, a sequence of
            str).
    """
    subject = resolve_subject(user=user, chain=chain, token=token, where="acting_for")
    if subject is None:
        raise ValueError(
            "acting_for: expected one of user=, token= or chain=, got none"
        )
    reset = _current.set(subject)
    try:
        yield subject
    finally:
        _current.reset(reset)


def current_subject() -> Subject | None:
    """The subject of the innermost ``acting_for`` block, or ``None``."""
    return _current.get()


def resolve_subject(
    *,
    user: str | None = None,
    chain: Sequence[str] | None = None,
    token: str | None = None,
    where: str = "decide",
) -> Subject | None:
    """Build the subject named by at most one of ``user``, ``chain``, ``token``.

    Args:
        user, chain, token: as ``acting_for``; all ``None`` means none given.
        where: the caller's name, for error messages.

    Returns:
        The ``Subject``, or ``None`` when none of the three is given.

    Raises:
        ValueError, TypeError: as ``acting_for``.
    """
    given = [
        name
        for name, value in (("user", user), ("chain", chain), ("token", token))
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"{where}: expected at most one of user=, chain=, token=,"
            f" got {', '.join(given)}"
        )
    if user is not None:
        return Subject(chain=(_principal(user, f"{where}: user"),))
    if chain is not None:
        return Subject(chain=_chain(chain, where))
    if token is not None:
        if not isinstance(token, str) or not token:
            raise _bad(f"{where}: token", "a non-empty str", token)
        return Subject(token=token)
    return None


def _chain(chain: Sequence[str], where: str) -> tuple[str, ...]:
    # A bare str is a Sequence[str] too; "alice" must not become a-l-i-c-e.
    if isinstance(chain, str | bytes) or not isinstance(chain, Sequence):
        raise TypeError(
            f"{where}: chain expected a list of principal ids,"
            f" got {type(chain).__name__}"
        )
    if not chain:
        raise ValueError(f"{where}: chain expected at least one principal, got []")
    return tuple(
        _principal(item, f"{where}: chain[{index}]") for index, item in enumerate(chain)
    )


def _principal(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(where, "a non-empty str", value)
    return value


def _bad(where: str, expected: str, got: object) -> Exception:
    if isinstance(got, str):
        return ValueError(f"{where} expected {expected}, got {got!r}")
    return TypeError(f"{where} expected {expected}, got {type(got).__name__}")
