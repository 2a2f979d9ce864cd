"""acting_for: per task, per thread, nested, restored, never global."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest
from kynara_sdk import Subject, acting_for, current_subject


def test_no_subject_outside_any_block():
    assert current_subject() is None


@pytest.mark.parametrize(
    ("kwargs", "subject"),
    [
        ({"user": "alice"}, Subject(chain=("alice",))),
        ({"chain": ["alice", "planner"]}, Subject(chain=("alice", "planner"))),
        ({"chain": ("alice",)}, Subject(chain=("alice",))),
        ({"token": "eyJ.a.b"}, Subject(token="eyJ.a.b")),
    ],
    ids=["user", "chain-list", "chain-tuple", "token"],
)
def test_block_sets_the_subject_and_yields_it(kwargs, subject):
    with acting_for(**kwargs) as current:
        inside = current_subject()

    assert current == subject
    assert inside == subject
    assert current_subject() is None


def test_blocks_nest_inner_wins_and_outer_comes_back():
    with acting_for(user="alice"):
        with acting_for(chain=["bob", "planner"]):
            inner = current_subject()
        after_inner = current_subject()

    assert inner == Subject(chain=("bob", "planner"))
    assert after_inner == Subject(chain=("alice",))
    assert current_subject() is None


def test_subject_is_restored_when_the_block_raises():
    with acting_for(user="alice"):
        with pytest.raises(RuntimeError, match="boom"):
            with acting_for(user="mallory"):
                raise RuntimeError("boom")
        after = current_subject()

    assert after == Subject(chain=("alice",))


def test_two_concurrent_tasks_never_see_each_others_subject():
    async def as_user(user, started, other_started):
        with acting_for(user=user):
            started.set()
            await other_started.wait()  # both blocks are open at this point
            return current_subject()

    async def both():
        alice_in, bob_in = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(
            as_user("alice", alice_in, bob_in), as_user("bob", bob_in, alice_in)
        )

    alice, bob = asyncio.run(both())

    assert alice == Subject(chain=("alice",))
    assert bob == Subject(chain=("bob",))


def test_two_threads_never_see_each_others_subject():
    barrier = threading.Barrier(2, timeout=10)
    seen: dict[str, Subject | None] = {}

    def as_user(user):
        with acting_for(user=user):
            barrier.wait()  # both blocks are open at this point
            seen[user] = current_subject()

    threads = [threading.Thread(target=as_user, args=(u,)) for u in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert seen == {"alice": Subject(chain=("alice",)), "bob": Subject(chain=("bob",))}
    assert current_subject() is None


def test_a_new_thread_starts_without_the_callers_subject():
    seen = []

    with acting_for(user="alice"):
        thread = threading.Thread(target=lambda: seen.append(current_subject()))
        thread.start()
        thread.join(10)

    assert seen == [None]


def test_copied_context_carries_the_subject_into_a_thread():
    seen = []

    with acting_for(user="alice"):
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(lambda: seen.append(current_subject()),)
        )
        thread.start()
        thread.join(10)

    assert seen == [Subject(chain=("alice",))]


def test_to_thread_carries_the_subject():
    async def run():
        with acting_for(user="alice"):
            return await asyncio.to_thread(current_subject)

    assert asyncio.run(run()) == Subject(chain=("alice",))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {},
            ValueError,
            r"^acting_for: expected one of user=, token= or chain=, got none$",
        ),
        (
            {"user": "alice", "token": "t"},
            ValueError,
            r"^acting_for: expected at most one of user=, chain=, token=,"
            r" got user, token$",
        ),
        (
            {"user": ""},
            ValueError,
            r"^acting_for: user expected a non-empty str, got ''$",
        ),
        (
            {"user": 7},
            TypeError,
            r"^acting_for: user expected a non-empty str, got int$",
        ),
        (
            {"chain": "alice"},
            TypeError,
            r"^acting_for: chain expected a list of principal ids, got str$",
        ),
        (
            {"chain": []},
            ValueError,
            r"^acting_for: chain expected at least one principal, got \[\]$",
        ),
        (
            {"chain": ["alice", ""]},
            ValueError,
            r"^acting_for: chain\[1\] expected a non-empty str, got ''$",
        ),
        (
            {"token": ""},
            ValueError,
            r"^acting_for: token expected a non-empty str, got ''$",
        ),
    ],
    ids=[
        "none",
        "two",
        "empty-user",
        "int-user",
        "str-chain",
        "empty-chain",
        "empty-principal",
        "empty-token",
    ],
)
def test_malformed_subject_is_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        with acting_for(**kwargs):
            pass

    assert current_subject() is None
