"""``@permission_required``: ask the daemon before a tool's body runs.

The decorated function's arguments are bound to its signature (defaults
applied) and mapped into the request: one argument is the resource id, some
become resource attributes, some caller context. The body runs only on
allow. Everything else raises before the body, so a tool fails closed: deny
raises ``PermissionDenied``, require_approval ``ApprovalRequired``, and no
answer at all (daemon down, bad value, any error) raises that error.

With ``on_approval="wait"`` a require_approval is waited on instead: the
decorator streams the approval's state (``wait_approval``) for up to
``approval_timeout`` seconds; once approved it asks again with the grant
(the same request, plus the approval id) and runs the body on that allow,
once. A wait that times out raises ``ApprovalTimeout`` and leaves the
approval pending; a rejection or expiry raises ``ApprovalRejected`` or
``ApprovalExpired``; the body never runs without an allow. ``on_wait`` is
called with the require_approval decision just before the wait starts, so
the agent can pass the approval's URL to someone who can review it. When
the answer already cites an approved grant of this request (the daemon
hands back an approved, unused approval to a caller that lost its id), in
either mode there is nothing to wait for: no ``on_wait``, no wait, the
retry with the grant at once. So an agent told to ask again once a
reviewer approved simply calls the tool again.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from kynara_sdk.client import AsyncClient, Client, resolve_target
from kynara_sdk.decision import ALLOW, DENY, REQUIRE_APPROVAL, Decision
from kynara_sdk.errors import ApprovalRequired, PermissionDenied

__all__ = [
    "DEFAULT_APPROVAL_TIMEOUT",
    "close_default_clients",
    "current_decision",
    "default_async_client",
    "default_client",
    "permission_required",
]

F = TypeVar("F", bound=Callable[..., Any])
OnApproval = Literal["raise", "wait"]
# Told of a require_approval decision before a wait on it; an async tool may
# give a coroutine function.
OnWait = Callable[[Decision], Any]
# How long a waiting tool waits for a reviewer by default: long enough for a
# person to notice and decide, short enough that an agent is not parked for
# hours holding its caller. Pass approval_timeout for another bound.
DEFAULT_APPROVAL_TIMEOUT = 300.0
ArgumentMap = Sequence[str] | Mapping[str, str] | None

_lock = threading.Lock()
_clients: dict[str, Client] = {}
_async_clients: dict[str, AsyncClient] = {}
_decision: contextvars.ContextVar[Decision | None] = contextvars.ContextVar(
    "kynara_decision", default=None
)


def current_decision() -> Decision | None:
    """The allow that let the running decorated body start, or ``None``.

    A tool can log its ``decision_id`` to tie its own records to the audit
    log. Inside nested decorated calls it is the innermost one's.
    """
    return _decision.get()


def default_client() -> Client:
    """The shared ``Client`` for ``$KYNARA_TARGET``, created on first use."""
    target = resolve_target()
    with _lock:
        if target not in _clients:
            _clients[target] = Client(target)
        return _clients[target]


def default_async_client() -> AsyncClient:
    """The shared ``AsyncClient`` for ``$KYNARA_TARGET``, created on first use."""
    target = resolve_target()
    with _lock:
        if target not in _async_clients:
            _async_clients[target] = AsyncClient(target)
        return _async_clients[target]


def close_default_clients() -> None:
    """Close the shared sync and async clients.

    Async clients are discarded, not awaited: their connections belong to
    event loops that may be gone. The next decorated call creates fresh
    clients.
    """
    with _lock:
        clients = list(_clients.values())
        async_clients = list(_async_clients.values())
        _clients.clear()
        _async_clients.clear()
    for client in clients:
        client.close()
    for async_client in async_clients:
        async_client.discard()


def permission_required(
    action: str,
    *,
    resource_kind: str,
    resource_arg: str | None = None,
    attrs: ArgumentMap = None,
    context: ArgumentMap = None,
    client: Client | AsyncClient | None = None,
    on_approval: OnApproval = "raise",
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT,
    on_wait: OnWait | None = None,
) -> Callable[[F], F]:
    """Decorate a sync or async function so it runs only when allowed.

    Args:
        action: dotted action name, e.g. ``payments.refund.issue``.
        resource_kind: dotted resource kind, e.g. ``payments.refund``.
        resource_arg: the argument holding the resource id (a str, int or
            UUID), or ``None`` for no id.
        attrs: arguments sent as resource attributes: a list of argument
            names (attribute named like the argument), or a dict of
            attribute name to argument name.
        context: arguments sent as caller context, in the same forms.
        client: the ``Client`` (sync function) or ``AsyncClient`` (async
            function) to ask; default the shared one for ``$KYNARA_TARGET``.
        on_approval: on require_approval, ``"raise"`` ``ApprovalRequired``
            (the default), or ``"wait"`` for a reviewer, then retry with the
            grant and run the body on its allow.
        approval_timeout: seconds ``"wait"`` waits for a reviewer.
        on_wait: with ``"wait"``, called once per wait with the
            require_approval ``Decision`` (its ``approval.url`` and
            ``approval.id``) just before waiting starts, e.g. to print or
            post the link for a reviewer. For an async function it may be a
            coroutine function (it is awaited). What it raises propagates
            and the body does not run.

    Returns:
        The decorator. The wrapped function keeps its name and signature,
        and raises before its body runs:

        - ``PermissionDenied`` on deny (a retry with the grant included:
          e.g. ``approval_used``);
        - ``ApprovalRequired`` on require_approval (``"raise"``);
        - ``ApprovalTimeout``, ``ApprovalRejected``, ``ApprovalExpired``
          when a wait ends without a grant (``"wait"``); each carries the
          ``decision_id`` that asked and the ``approval_id``;
        - ``KynaraUnavailable`` / ``KynaraError`` when no answer came;
        - ``TypeError`` / ``ValueError`` when an argument has no wire form.

    Raises:
        ValueError: a mapped argument is not a parameter of the function;
            ``on_approval`` is neither mode; ``approval_timeout`` is not a
            positive number of seconds; ``on_wait`` is given without
            ``on_approval="wait"``.
        TypeError: ``client`` does not suit the function (an ``AsyncClient``
            for a sync function, or the reverse); ``on_wait`` is not
            callable.
    """
    attr_map = argument_map(attrs, "attrs")
    context_map = argument_map(context, "context")
    waiting = Waiting.of(on_approval, approval_timeout, on_wait)

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        names = [name for name in (resource_arg,) if name is not None]
        names += [*attr_map.values(), *context_map.values()]
        _check_parameters(fn, signature, names)
        is_async = inspect.iscoroutinefunction(fn)
        _check_client(fn, client, is_async)

        def request_of(args: tuple, kwargs: dict) -> dict[str, Any]:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = _flatten(signature, bound.arguments)
            return tool_request(
                arguments, resource_kind, resource_arg, attr_map, context_map
            )

        if is_async:

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                asker = client if client is not None else default_async_client()
                decision = await decide_async(
                    asker, action, request_of(args, kwargs), waiting
                )
                enforce(decision)
                reset = _decision.set(decision)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    _decision.reset(reset)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            asker = client if client is not None else default_client()
            decision = decide_sync(asker, action, request_of(args, kwargs), waiting)
            enforce(decision)
            reset = _decision.set(decision)
            try:
                return fn(*args, **kwargs)
            finally:
                _decision.reset(reset)

        return wrapper  # type: ignore[return-value]

    return decorate


@dataclasses.dataclass(frozen=True, slots=True)
class Waiting:
    """What a check does with require_approval: raise (``waits`` False), or
    wait up to ``timeout`` seconds for a reviewer, telling ``on_wait``
    first."""

    waits: bool
    timeout: float
    on_wait: OnWait | None

    @classmethod
    def of(cls, on_approval: object, timeout: object, on_wait: object) -> Waiting:
        """The settings, checked.

        Raises:
            ValueError: ``on_approval`` is neither mode; ``timeout`` is not a
                positive number of seconds; ``on_wait`` without a wait.
            TypeError: ``on_wait`` is not callable.
        """
        waits = _check_approval_mode(on_approval, timeout)
        _check_on_wait(on_wait, waits)
        return cls(waits, float(timeout), on_wait)  # type: ignore[arg-type]


def decide_sync(
    asker: Client, action: str, request: Mapping[str, Any], waiting: Waiting
) -> Decision:
    """Ask for ``request``; on require_approval, wait for a reviewer when
    ``waiting`` says so, then ask again with the grant. An answer citing an
    approved, unused grant of this very request is asked again with it at
    once, waiting or not.

    Raises:
        KynaraError: no answer, or a wait ended without a grant.
    """
    decision = asker.decide(action, **request)
    approval_id = _grant_to_use(decision, waiting)
    if approval_id is None:
        return decision
    if not _approved(decision):
        if waiting.on_wait is not None:
            waiting.on_wait(decision)
        asker.wait_approval(
            approval_id, waiting.timeout, decision_id=decision.decision_id
        )
    # The same request (same subject, same values), now with the grant: the
    # daemon allows it once, or says why not.
    return asker.decide(action, **request, approval_id=approval_id)


async def decide_async(
    asker: AsyncClient, action: str, request: Mapping[str, Any], waiting: Waiting
) -> Decision:
    """As ``decide_sync``, awaited; ``on_wait`` may return an awaitable."""
    decision = await asker.decide(action, **request)
    approval_id = _grant_to_use(decision, waiting)
    if approval_id is None:
        return decision
    if not _approved(decision):
        if waiting.on_wait is not None:
            told = waiting.on_wait(decision)
            if inspect.isawaitable(told):
                await told
        await asker.wait_approval(
            approval_id, waiting.timeout, decision_id=decision.decision_id
        )
    return await asker.decide(action, **request, approval_id=approval_id)


def enforce(decision: Decision) -> None:
    """Return on allow; raise ``PermissionDenied`` on deny and
    ``ApprovalRequired`` on require_approval."""
    if decision.decision == ALLOW:
        return
    if decision.decision == DENY:
        raise PermissionDenied(decision)
    # require_approval: asked not to wait, or asked again after a wait
    # (pending once more: the policies changed meanwhile, say).
    raise ApprovalRequired(decision)


def tool_request(
    arguments: Mapping[str, Any],
    resource_kind: str,
    resource_arg: str | None,
    attr_map: Mapping[str, str],
    context_map: Mapping[str, str],
) -> dict[str, Any]:
    """The request fields for a call with ``arguments`` (by name).

    Raises:
        TypeError: the resource id argument is not a str, int or UUID.
    """
    return {
        "resource_kind": resource_kind,
        "resource_id": _resource_id(arguments, resource_arg),
        "attributes": _pick(arguments, attr_map),
        "context": _pick(arguments, context_map),
    }


def _grant_to_use(decision: Decision, waiting: Waiting) -> str | None:
    # The approval whose grant the call asks again with, if any: one already
    # approved, or (waiting) one to wait on. Without an id there is nothing
    # to wait on: the caller raises instead.
    if decision.decision != REQUIRE_APPROVAL or decision.approval is None:
        return None
    if not decision.approval.id:
        return None
    if _approved(decision) or waiting.waits:
        return decision.approval.id
    return None


def _approved(decision: Decision) -> bool:
    # The daemon cites an approved, unused grant of this very request (a
    # wait that timed out earlier, then a reviewer approved): nothing is
    # left to wait for, so the retry with it comes at once.
    return decision.approval is not None and decision.approval.state == "approved"


def _check_approval_mode(on_approval: object, timeout: object) -> bool:
    if on_approval not in ("raise", "wait"):
        raise ValueError(
            f"on_approval: expected 'raise' or 'wait', got {on_approval!r}"
        )
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not timeout > 0
    ):
        raise ValueError(f"approval_timeout: expected seconds > 0, got {timeout!r}")
    return on_approval == "wait"


def _check_on_wait(on_wait: object, waits: bool) -> None:
    if on_wait is None:
        return
    if not callable(on_wait):
        raise TypeError(
            f"on_wait: expected a callable taking the Decision, got"
            f" {type(on_wait).__name__}"
        )
    if not waits:
        raise ValueError(
            "on_wait: expected on_approval='wait' with it; without a wait it"
            " would never be called"
        )


def argument_map(spec: ArgumentMap, where: str) -> dict[str, str]:
    """``attrs`` / ``context`` as a dict of request name to argument name.

    Raises:
        TypeError: ``spec`` is neither a list of names nor a dict of them.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    elif isinstance(spec, str) or not isinstance(spec, Sequence):
        raise TypeError(
            f"{where}: expected a list of argument names or a dict of"
            f" attribute name to argument name, got {type(spec).__name__}"
        )
    else:
        pairs = [(name, name) for name in spec]
    for key, name in pairs:
        if not isinstance(key, str) or not isinstance(name, str):
            raise TypeError(f"{where}: expected str names, got {key!r} -> {name!r}")
    return dict(pairs)


def _check_parameters(
    fn: Callable, signature: inspect.Signature, names: list[str]
) -> None:
    takes_kwargs = any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )
    for name in names:
        if name not in signature.parameters and not takes_kwargs:
            raise ValueError(
                f"permission_required on {fn.__qualname__}: expected {name!r} to"
                f" be a parameter, got parameters {list(signature.parameters)}"
            )


def _check_client(fn: Callable, client: object, is_async: bool) -> None:
    wanted = AsyncClient if is_async else Client
    if client is not None and not isinstance(client, wanted):
        kind = "an async" if is_async else "a sync"
        raise TypeError(
            f"permission_required on {fn.__qualname__}: {kind} function needs"
            f" client={wanted.__name__}, got {type(client).__name__}"
        )


def _flatten(
    signature: inspect.Signature, arguments: Mapping[str, Any]
) -> dict[str, Any]:
    # Arguments caught by **kwargs are addressable by their own names.
    flat = dict(arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(flat.pop(name, {}))
    return flat


def _pick(arguments: Mapping[str, Any], mapping: Mapping[str, str]) -> dict:
    # Only a name left out of **kwargs can be missing; it stays absent so a
    # policy's has() sees it absent, rather than an invented null.
    return {key: arguments[name] for key, name in mapping.items() if name in arguments}


def _resource_id(arguments: Mapping[str, Any], resource_arg: str | None) -> str:
    if resource_arg is None:
        return ""
    value = arguments.get(resource_arg)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | uuid.UUID) and not isinstance(value, bool):
        return str(value)
    raise TypeError(
        f"argument {resource_arg!r} (the resource id): expected str, int or UUID,"
        f" got {type(value).__name__}"
    )
