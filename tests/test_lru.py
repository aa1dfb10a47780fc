"""The one LRU bound (app/lru.py) behind the local cache tier, the verified JWTs and the
outage snapshot: which entry goes first, what counts as a use, and a bound of 0."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.domain.credits import Claim
from app.lru import LRU
from app.outage.last_known import KEYS_PER_USER, LastKnown
from app.schemas import UserCredits

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def filled(*keys: str, size: int = 3) -> LRU[str, int]:
    lru: LRU[str, int] = LRU(size)
    for n, key in enumerate(keys):
        lru.put(key, n)
    return lru


def test_the_least_recently_put_goes_first() -> None:
    lru = filled("a", "b", "c", "d")
    assert [key for key, _ in lru.items()] == ["b", "c", "d"]


def test_a_get_and_a_put_are_uses_a_peek_is_not() -> None:
    lru = filled("a", "b", "c")
    assert lru.get("a") == 0
    lru.put("b", 9)
    assert lru.peek("c") == 2
    lru.put("d", 3)
    assert [key for key, _ in lru.items()] == ["a", "b", "d"]
    assert (lru.get("c"), lru.peek("c"), "c" in lru, lru.peek("b")) == (None, None, False, 9)


def test_a_bound_of_zero_keeps_nothing() -> None:
    lru = filled("a", size=0)
    assert (len(lru), lru.get("a")) == (0, None)
    with pytest.raises(ValueError, match="negative"):
        LRU[str, int](-1)


def test_items_is_a_copy_the_caller_may_change_the_table_through() -> None:
    lru = filled("a", "b", "c")
    for key, _ in lru.items():
        lru.pop(key)
    assert (len(lru), lru.pop("a")) == (0, None)
    lru.put("e", 4)
    lru.clear()
    assert len(lru) == 0


def test_the_fallback_reading_the_snapshot_does_not_keep_a_user_in_it() -> None:
    seen = LastKnown(max_users=2)
    seen.saw_consent("a", None)
    seen.saw_consent("b", None)
    assert seen.of("a") is not None
    seen.saw_consent("c", None)
    assert (seen.of("a"), seen.of("b") is not None) == (None, True)


def test_a_users_keys_go_in_the_order_first_applied() -> None:
    """The per-user bound on keys is first in, first out: a key applied again keeps its
    place, it is not refreshed as an LRU would."""
    seen = LastKnown()
    credits = UserCredits(
        user_id="u",
        is_guest=True,
        available_credits=3,
        max_credits=10,
        last_reset_timestamp=T0,
        next_reset_at=T0,
    )
    for n in range(KEYS_PER_USER):
        seen.saw_key(credits, f"k{n}", Claim("deduction", None))
    seen.saw_key(credits, "k0", Claim("refund", None))
    seen.saw_key(credits, "new", Claim("deduction", None))
    known = seen.of("u")
    assert known is not None and known.keys is not None
    assert list(known.keys) == [f"k{n}" for n in range(1, KEYS_PER_USER)] + ["new"]
