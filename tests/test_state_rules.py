"""The one merge (app/domain/carry.py) rule by rule, and VERIFY (app/domain/state.py): pure,
no store. The stores that apply a plan are held to it by tests/test_handover.py,
tests/test_pg_state.py and the system state machine (tests/test_system_model.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.domain.carry import (
    CLAMP_NOTE,
    Carried,
    CarriedConsent,
    CarriedCredit,
    Fate,
    carried_state,
    carry,
    clamp_key,
)
from app.domain.credits import CARRIED_NOTE, Account, Claim, Deduct, Refund, Reset, Upgrade
from app.domain.state import (
    Erasure,
    KeyRecord,
    LedgerRecord,
    UserState,
    Verification,
    differences,
    later_consent,
    missing,
    verified,
)
from app.schemas import ConsentEvent, UserConsent
from tests.conftest import RULES

AT = datetime(2026, 11, 29, 12, tzinfo=UTC)
HORIZON = AT - timedelta(days=90)
DAY = timedelta(hours=24)


def row(
    amount: int,
    *,
    key: str | None = None,
    at: datetime = AT,
    kind: str = "",
    description: str | None = None,
    user: str = "u",
) -> LedgerRecord:
    kind = kind or ("deduction" if amount < 0 else "refund")
    return LedgerRecord(user, kind, amount, at, description, key)  # type: ignore[arg-type]


def consent(marketing: bool, updated: datetime, *, user: str = "u") -> UserConsent:
    return UserConsent(
        user_id=user,
        terms_accepted=True,
        marketing_consent=marketing,
        timestamp=AT,
        updated_at=updated,
        terms_version="1",
    )


def event(marketing: bool, at: datetime) -> ConsentEvent:
    return ConsentEvent(
        terms_accepted=True, marketing_consent=marketing, terms_version="1", recorded_at=at
    )


def account(
    available: int, *, at: datetime = AT - timedelta(hours=1), guest: bool = True
) -> Account:
    return Account("u", guest, available, 10 if guest else 50, at)


def plan_of(held: UserState, carried: UserState | Carried) -> object:
    incoming = carried if isinstance(carried, Carried) else carried_state(carried)
    return carry(held, incoming, RULES, HORIZON)


class TestIdentity:
    def test_a_row_is_known_by_everything_but_the_stores_id(self) -> None:
        held = LedgerRecord("u", "deduction", -1, AT, None, None, 900)
        assert missing([row(-1)], [held]) == []

    def test_two_equal_rows_stay_two(self) -> None:
        assert missing([row(-1), row(-1)], [row(-1)]) == [row(-1)]

    def test_the_key_and_the_instant_tell_rows_apart(self) -> None:
        later = AT + timedelta(microseconds=1)
        incoming = [row(-1, key="a"), row(-1, at=later)]
        assert missing(incoming, [row(-1, key="b"), row(-1)]) == incoming


class TestLaterConsent:
    def test_the_later_update_wins_either_way(self) -> None:
        old, new = consent(False, AT), consent(True, AT + timedelta(seconds=1))
        assert later_consent(new, old) == new
        assert later_consent(old, new) is None

    def test_a_tie_keeps_what_is_held(self) -> None:
        assert later_consent(consent(True, AT), consent(False, AT)) is None


class TestFirstCarry:
    def test_a_user_the_store_lacks_takes_the_carried_account_and_every_row(self) -> None:
        old = row(-2, key="k0", at=AT - timedelta(days=200))  # beyond the horizon: kept
        claim = KeyRecord("u", "k1", AT, Claim.of(Deduct(3)))
        carried = UserState("u", account(5), (old, row(-3, key="k1")), consent(True, AT), (claim,))
        plan = carry(UserState("u"), carried_state(carried), RULES, HORIZON)
        assert plan.account == account(5)
        assert plan.rows == (old, row(-3, key="k1"))
        assert plan.consent == consent(True, AT)
        assert plan.keys == (claim,)  # the claims carried, as they were

    def test_where_claims_do_not_travel_each_keyed_row_claims_its_key(self) -> None:
        carried = UserState("u", account(5), (row(-3, key="k1"), row(-2)))
        plan = carry(UserState("u"), carried_state(carried, keys=False), RULES, HORIZON)
        assert [(key.key, key.claim) for key in plan.keys] == [("k1", Claim("deduction", None))]


class TestSameHistory:
    def test_the_old_primarys_account_stands_and_the_rows_lacking_are_added(self) -> None:
        held = UserState("u", account(7), (row(-3, key="k1"),))
        carried = UserState("u", account(5), (row(-3, key="k1"), row(-2, key="k2")))
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        assert plan.account == account(5)
        assert plan.rows == (row(-2, key="k2"),)

    def test_a_key_the_store_holds_on_another_row_is_a_history_of_its_own(self) -> None:
        # Found by the system model: a key reused, on a replica that did not know it, for
        # another amount; the store's row stands, and so does its account.
        held = UserState("u", account(6), (row(-4, key="k"),))
        carried = UserState("u", account(5), (row(-5, key="k"),))
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        assert plan.account is None and plan.rows == ()
        assert plan.expected.account == account(6)

    def test_a_balance_changed_underneath_takes_the_carried_one(self) -> None:
        held = UserState("u", account(1), (row(-2, key="k1"),))
        carried = UserState("u", account(8), (row(-2, key="k1"),))
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        assert plan.account == account(8)
        assert plan.rows == ()


class TestOnTop:
    def test_a_later_write_the_store_acknowledged_is_never_undone(self) -> None:
        # Issue 26, finding 1: the database took replica A's x=7 and then a deduction of
        # 4 (3 left); replica B carries its own x=9 (a deduction of 1).
        held = UserState("u", account(3), (row(-3, key="a1"), row(-4, key="a2")))
        carried = UserState("u", account(9), (row(-1, key="b1"),))
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        assert plan.account == account(2)
        assert [(r.amount, r.idempotency_key) for r in plan.rows] == [(-1, "b1")]
        assert plan.tally.applied == 1

    def test_the_changes_go_on_top_in_the_order_they_were_made(self) -> None:
        held = UserState("u", account(9), (row(-1, key="own"),))
        later = AT + timedelta(minutes=1)
        carried = UserState("u", account(6), (row(2, key="r", at=later), row(-4, key="d", at=AT)))
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        # The deduction first (9 - 4), then the refund, capped at the maximum: 7.
        assert plan.account == account(7)
        assert [r.idempotency_key for r in plan.rows] == ["d", "r"]

    def test_a_deduction_that_no_longer_fits_is_clamped_and_keeps_its_key(self) -> None:
        held = UserState("u", account(2), (row(-8, key="own"),))
        carried = UserState("u", account(5), (row(-5, key="k"),))
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        assert plan.account == account(0)
        (clamped,) = plan.rows
        assert (clamped.amount, clamped.idempotency_key) == (-2, "k")
        assert clamped.description == CLAMP_NOTE.format(required=5)
        assert plan.credit_fates == (Fate.CLAMPED,)
        assert plan.tally.clamped == 1
        # Carried again, the clamped change is known by its key: nothing twice.
        again = carry(plan.expected, carried_state(carried), RULES, HORIZON)
        assert (again.account, again.rows) == (None, ())

    def test_a_clamped_row_without_a_key_is_known_afterwards_by_one_made_from_it(self) -> None:
        unkeyed = row(-5)
        held = UserState("u", account(2), (row(-8, key="own"),))
        plan = carry(held, carried_state(UserState("u", account(5), (unkeyed,))), RULES, HORIZON)
        assert plan.rows[0].idempotency_key == clamp_key(unkeyed)
        again = carry(
            plan.expected, carried_state(UserState("u", account(5), (unkeyed,))), RULES, HORIZON
        )
        assert again.rows == ()

    def test_a_change_older_than_the_horizon_is_not_carried_onto_a_held_account(self) -> None:
        old = row(-2, key="old", at=HORIZON - timedelta(days=1))
        held = UserState("u", account(9), (row(-1, key="own"),))
        plan = carry(held, carried_state(UserState("u", account(7), (old,))), RULES, HORIZON)
        assert plan.rows == () and plan.account is None
        assert plan.credit_fates == (Fate.STALE,)

    def test_an_opening_row_is_not_a_change(self) -> None:
        opening = row(-4, description=CARRIED_NOTE)
        held = UserState("u", account(9), (row(-1, key="own"),))
        carried = UserState("u", account(6), (opening,))
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        assert plan.rows == () and plan.account is None


class TestRefillOnce:
    def test_a_refill_the_store_made_since_is_not_made_again(self) -> None:
        refilled = AT - timedelta(minutes=5)
        held = UserState("u", account(10, at=refilled), (row(-1, key="own", at=AT),))
        carried = UserState(
            "u", account(10, at=AT - timedelta(minutes=10)),
            (row(4, kind="reset", at=AT - timedelta(minutes=10)),),
        )  # fmt: skip
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        assert plan.rows == () and plan.account is None

    def test_a_refill_due_for_the_store_too_is_made_on_its_balance(self) -> None:
        stale = AT - 2 * DAY
        held = UserState("u", account(3, at=stale), (row(-7, key="own", at=stale),))
        carried = UserState("u", account(8, at=AT), (row(5, kind="reset", at=AT), row(-2, key="b")))
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        assert plan.account == Account("u", True, 8, 10, AT)
        assert [(r.kind, r.amount) for r in plan.rows] == [("reset", 7), ("deduction", -2)]

    def test_a_journaled_reset_shown_by_the_account_is_not_made_again(self) -> None:
        held = UserState("u", account(10, at=AT), (row(-1, key="own", at=AT),))
        carried = Carried("u", credits=(CarriedCredit(Reset(), AT - timedelta(seconds=1)),))
        plan = carry(held, carried, RULES, HORIZON)
        assert plan.credit_fates == (Fate.HELD,) and plan.rows == ()


class TestJournaledChanges:
    def test_a_change_whose_key_the_store_holds_lands_once(self) -> None:
        deduct = Deduct(2)
        credit = CarriedCredit(deduct, AT, "k", Claim.of(deduct))
        held = UserState("u", account(8), keys=(KeyRecord("u", "k", AT, Claim.of(deduct)),))
        plan = carry(held, Carried("u", credits=(credit, credit)), RULES, HORIZON)
        assert plan.credit_fates == (Fate.HELD, Fate.HELD)
        assert plan.rows == ()

    def test_a_key_carried_twice_is_applied_once(self) -> None:
        deduct = Deduct(2)
        credit = CarriedCredit(deduct, AT, "k", Claim.of(deduct))
        plan = carry(
            UserState("u", account(8)), Carried("u", credits=(credit, credit)), RULES, HORIZON
        )
        assert plan.credit_fates == (Fate.APPLIED, Fate.HELD)
        assert plan.account == account(6)

    def test_a_key_the_store_holds_for_another_request_is_a_conflict(self) -> None:
        asked = Deduct(2)
        held = UserState("u", account(8), keys=(KeyRecord("u", "k", AT, Claim.of(Deduct(3))),))
        carried = Carried("u", credits=(CarriedCredit(asked, AT, "k", Claim.of(asked)),))
        plan = carry(held, carried, RULES, HORIZON)
        assert plan.credit_fates == (Fate.CONFLICT,) and plan.tally.conflicts == 1

    def test_a_refund_that_credits_nothing_still_claims_its_key(self) -> None:
        refund = Refund(3)
        carried = Carried("u", credits=(CarriedCredit(refund, AT, "r", Claim.of(refund)),))
        plan = carry(UserState("u", account(10)), carried, RULES, HORIZON)
        assert plan.rows == ()
        assert [key.key for key in plan.keys] == ["r"]

    def test_an_upgrade_is_the_same_however_often_it_lands(self) -> None:
        upgraded = Account("u", False, 50, 50, AT - timedelta(hours=1))
        carried = Carried("u", credits=(CarriedCredit(Upgrade(), AT),))
        assert carry(UserState("u", upgraded), carried, RULES, HORIZON).rows == ()


class TestErased:
    ERASED_AT = AT

    def held(self) -> UserState:
        record = Erasure(
            "!erased:u", self.ERASED_AT, Account("!erased:u", True, 4, 10, AT - timedelta(hours=2))
        )
        return UserState("u", erasure=record)

    def test_nothing_made_at_or_before_the_erasure_is_carried(self) -> None:
        # Issue 26, finding 4: another replica's hand-over after the erasure.
        carried = UserState(
            "u",
            account(7),
            (row(-3, key="k", at=AT - timedelta(minutes=1)),),
            consent(True, AT),
            (KeyRecord("u", "k", AT - timedelta(minutes=1), Claim("deduction", None)),),
            (event(True, AT),),
        )
        plan = carry(self.held(), carried_state(carried), RULES, HORIZON)
        assert not plan.writes
        assert plan.tally.erased == 1

    def test_what_came_after_is_applied_on_the_erased_account(self) -> None:
        after = AT + timedelta(minutes=1)
        carried = UserState(
            "u", account(7), (row(-3, key="old", at=AT), row(-1, key="new", at=after))
        )
        plan = carry(self.held(), carried_state(carried), RULES, HORIZON)
        # ERASED RESUMES at 4 (its spent part one row), then the deduction of 1.
        assert plan.account == Account("u", True, 3, 10, AT - timedelta(hours=2))
        assert [(r.amount, r.description) for r in plan.rows] == [(-6, CARRIED_NOTE), (-1, None)]

    def test_a_journaled_consent_made_before_the_erasure_is_dropped(self) -> None:
        change = CarriedConsent(AT - timedelta(seconds=1), True, True, "1")
        plan = carry(self.held(), Carried("u", consents=(change,)), RULES, HORIZON)
        assert plan.consent_fates == (Fate.ERASED,) and not plan.writes


class TestConsents:
    def test_the_history_is_the_union_of_events(self) -> None:
        held = UserState("u", consent=consent(True, AT), events=(event(True, AT),))
        later = AT + timedelta(minutes=1)
        carried = UserState(
            "u", consent=consent(False, later), events=(event(True, AT), event(False, later))
        )
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        assert plan.consent == consent(False, later)
        assert plan.events == (event(False, later),)

    def test_a_journaled_change_a_later_one_superseded_keeps_its_event(self) -> None:
        later = AT + timedelta(minutes=1)
        held = UserState("u", consent=consent(True, later), events=(event(True, later),))
        change = CarriedConsent(AT, False, True, "1", event(False, AT))
        plan = carry(held, Carried("u", consents=(change,)), RULES, HORIZON)
        assert plan.consent is None
        assert plan.events == (event(False, AT),)

    def test_a_marketing_change_applies_to_the_consent_the_store_holds(self) -> None:
        held = UserState("u", consent=consent(True, AT))
        later = AT + timedelta(minutes=1)
        plan = carry(held, Carried("u", consents=(CarriedConsent(later, False),)), RULES, HORIZON)
        assert plan.consent is not None
        assert (plan.consent.marketing_consent, plan.consent.updated_at) == (False, later)
        assert plan.consent.terms_version == "1"


class TestBooks:
    def test_a_pseudonyms_rows_are_added_as_they_are(self) -> None:
        books = row(-3, user="!erased:ab")
        held = UserState("!erased:ab", ledger=(books,))
        carried = UserState("!erased:ab", ledger=(books, row(-1, user="!erased:ab")))
        plan = carry(held, carried_state(carried), RULES, HORIZON)
        assert plan.rows == (row(-1, user="!erased:ab"),)


class TestDifferences:
    def test_an_exact_copy_has_none(self) -> None:
        state = UserState("u", account(7), (row(-3),), consent(True, AT))
        assert differences(state, state) == []

    def test_each_account_field_is_named(self) -> None:
        held = UserState("u", Account("u", False, 6, 50, AT))
        assert differences(UserState("u", account(7)), held) == [
            "balance 6, expected 7",
            "maximum 50, expected 10",
            "tier registered, expected guest",
        ]

    def test_a_missing_account_row_key_consent_or_event_is_named(self) -> None:
        expected = UserState(
            "u",
            account(7),
            (row(-3), row(-1)),
            consent(True, AT),
            (KeyRecord("u", "k", AT, Claim("deduction", None)),),
            (event(True, AT),),
        )
        assert differences(expected, UserState("u", ledger=(row(-3),))) == [
            "account missing",
            "1 ledger row(s) missing: ledger sum -3, expected -4",
            "1 claimed key(s) missing",
            "consent differs",
            "1 consent event(s) missing",
        ]

    def test_a_key_held_on_a_row_is_held(self) -> None:
        expected = UserState("u", keys=(KeyRecord("u", "k", AT, Claim("deduction", None)),))
        assert differences(expected, UserState("u", ledger=(row(-1, key="k"),))) == []

    def test_a_later_consent_held_and_extra_rows_are_no_difference(self) -> None:
        expected = UserState("u", account(7), (row(-3),), consent(False, AT))
        held = UserState(
            "u", account(7), (row(-3), row(-2)), consent(True, AT + timedelta(seconds=1))
        )
        assert differences(expected, held) == []


class TestVerification:
    def test_a_user_verified_again_replaces_its_earlier_result(self) -> None:
        verification = Verification()
        expected = [UserState("u", account(7))]
        verification.record(["u"], verified(expected, [UserState("u")]))
        assert verification.mismatches == 1
        assert verification.samples() == [{"user_id": "u", "differences": ["account missing"]}]
        verification.record(["u"], verified(expected, expected))
        assert verification.mismatches == 0
