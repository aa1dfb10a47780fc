"""The outage journal's records (app/outage/journal.py): each kind comes back as it was
journaled, and records written before the journal moved to msgspec (by `json`, instants
by `isoformat()`) still read as the same changes, so an upgrade replays what an earlier
version left."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import get_args

import msgspec
import pytest

from app.domain.credits import Attempt, Change, Deduct, Refund, Reset, Upgrade
from app.outage.journal import (
    ConsentRecorded,
    CreditChange,
    MarketingChanged,
    Served,
    decode,
    encode,
)

AT = datetime(2026, 3, 1, 12, 30, 5, 123456, tzinfo=UTC)
PLUS_2 = datetime(2026, 3, 1, 14, 30, 5, tzinfo=timezone(timedelta(hours=2)))

# As the journal wrote them before msgspec, with the changes they hold.
WRITTEN_BEFORE: list[tuple[str, Served]] = [
    (
        '{"kind":"credit","user_id":"alice","change":{"type":"Deduct","amount":3,'
        '"is_guest":false,"description":"a question"},"at":"2026-03-01T12:30:05.123456+00:00",'
        '"key":"client-key-1","own_key":false}',
        CreditChange("alice", Deduct(3, False, "a question"), Attempt(AT, "client-key-1")),
    ),
    (
        '{"kind":"credit","user_id":"bob","change":{"type":"Refund","amount":2,'
        '"description":null},"at":"2026-03-01T14:30:05+02:00","key":"svc:9f","own_key":true}',
        CreditChange("bob", Refund(2, None), Attempt(PLUS_2, "svc:9f", own_key=True)),
    ),
    (
        '{"kind":"credit","user_id":"carol","change":{"type":"Upgrade"},'
        '"at":"2026-03-01T12:30:05.123456+00:00","key":null,"own_key":false}',
        CreditChange("carol", Upgrade(), Attempt(AT, None)),
    ),
    (
        '{"kind":"credit","user_id":"dan","change":{"type":"Reset"},'
        '"at":"2026-03-01T12:30:05.123456+00:00","key":"reset-1","own_key":false}',
        CreditChange("dan", Reset(), Attempt(AT, "reset-1")),
    ),
    (
        '{"kind":"consent","user_id":"erin","terms_accepted":true,"marketing_consent":false,'
        '"terms_version":"2026-01","now":"2026-03-01T12:30:05.123456+00:00"}',
        ConsentRecorded("erin", True, False, "2026-01", AT),
    ),
    (
        '{"kind":"consent","user_id":"frank","terms_accepted":false,"marketing_consent":true,'
        '"terms_version":null,"now":"2026-03-01T14:30:05+02:00"}',
        ConsentRecorded("frank", False, True, None, PLUS_2),
    ),
    (
        '{"kind":"marketing","user_id":"gina","marketing_consent":true,'
        '"now":"2026-03-01T12:30:05.123456+00:00","terms_accepted":true,"terms_version":"2026-01"}',
        MarketingChanged("gina", True, AT, True, "2026-01"),
    ),
    (  # from before a marketing change kept the consent it changed
        '{"kind":"marketing","user_id":"hugo","marketing_consent":false,'
        '"now":"2026-03-01T12:30:05.123456+00:00"}',
        MarketingChanged("hugo", False, AT),
    ),
]


def replayed(served: Served) -> Served:
    """`served` as decoding gives it back: a credit change possibly sent already."""
    if isinstance(served, CreditChange):
        attempt = served.attempt
        again = Attempt(attempt.at, attempt.key, own_key=attempt.own_key, sent=True)
        return CreditChange(served.user_id, served.change, again)
    return served


def same(read: Served, served: Served) -> bool:
    """Equal, and instants at the same offset too (the repr shows it)."""
    return read == served and repr(read) == repr(served)


@pytest.mark.parametrize(("text", "served"), WRITTEN_BEFORE)
def test_a_record_written_before_msgspec_reads_as_the_same_change(
    text: str, served: Served
) -> None:
    assert same(decode(text), replayed(served))


@pytest.mark.parametrize(("text", "served"), WRITTEN_BEFORE)
def test_every_kind_of_record_comes_back_as_it_was_journaled(text: str, served: Served) -> None:
    assert same(decode(encode(served)), replayed(served))


def test_every_kind_of_credit_change_is_among_the_records() -> None:
    written = {
        type(served.change) for _, served in WRITTEN_BEFORE if isinstance(served, CreditChange)
    }
    assert written == set(get_args(Change))


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        "{}",
        '{"kind":"refund","user_id":"x"}',
        '{"kind":"credit","user_id":"x","change":{"type":"Grant","amount":1},'
        '"at":"2026-03-01T12:30:05+00:00","key":null,"own_key":false}',
        '{"kind":"credit","user_id":"x","change":{"type":"Deduct","amount":"three"},'
        '"at":"2026-03-01T12:30:05+00:00","key":null,"own_key":false}',
        '{"kind":"credit","user_id":"x","change":{"type":"Reset","amount":1},'
        '"at":"2026-03-01T12:30:05+00:00","key":null,"own_key":false}',
        '{"kind":"credit","user_id":"x","change":{"type":"Reset"},"at":"yesterday",'
        '"key":null,"own_key":false}',
        '{"kind":"consent","user_id":"x","terms_accepted":true,"marketing_consent":false,'
        '"now":"2026-03-01T12:30:05+00:00"}',
        '{"kind":"marketing","user_id":"x","marketing_consent":true,'
        '"now":"2026-03-01T12:30:05+00:00","extra":1}',
    ],
    ids=[
        "not-json",
        "not-an-object",
        "no-kind",
        "unknown-kind",
        "unknown-change",
        "wrong-type",
        "unknown-field-of-a-change",
        "not-an-instant",
        "missing-field",
        "unknown-field",
    ],
)
def test_a_record_holding_no_change_is_a_value_error(text: str) -> None:
    """What the replay moves to the dead letters (tests/test_fallback.py)."""
    with pytest.raises(ValueError) as raised:
        decode(text)
    assert isinstance(raised.value, msgspec.DecodeError)
