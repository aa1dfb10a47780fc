"""The credit rules themselves (app/domain/credits.py), without a store: each rule of
SPEC §3 with the figures it must give. The stores are held to the same rules by the
model-checked contract (tests/test_credit_model.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.domain.credits import (
    Account,
    Claim,
    CreditRules,
    Deduct,
    Entry,
    Outcome,
    Read,
    Refund,
    Reset,
    Upgrade,
)
from app.errors import IdempotencyKeyReusedError, InsufficientCreditsError

RULES = CreditRules(guest_max=10, registered_max=50, reset_period=timedelta(hours=24))
T0 = datetime(2026, 1, 15, 12, tzinfo=UTC)
DUE = T0 + timedelta(hours=24)  # the first instant a reset is due
SHORT_OF_DUE = DUE - timedelta(microseconds=1)


def guest(available: int, last_reset: datetime = T0) -> Account:
    return Account("u", True, available, 10, last_reset)


class TestFirstSight:
    @pytest.mark.parametrize(("is_guest", "full"), [(True, 10), (False, 50)])
    def test_an_unseen_account_opens_full_with_no_ledger_row(
        self, is_guest: bool, full: int
    ) -> None:
        assert RULES.apply(None, "u", Read(is_guest), T0) == Outcome(
            Account("u", is_guest, full, full, T0)
        )

    def test_a_deduction_opens_the_tier_it_names_and_other_changes_open_a_guest(self) -> None:
        opened = RULES.apply(None, "u", Deduct(5, is_guest=False), T0).account
        assert (opened.is_guest, opened.available) == (False, 45)
        assert RULES.apply(None, "u", Refund(5), T0).account.is_guest


class TestDueReset:
    def test_a_reset_is_due_exactly_one_period_after_the_last(self) -> None:
        assert RULES.apply(guest(3), "u", Read(), DUE) == Outcome(
            guest(10, DUE), (Entry("reset", 7, "credits reset"),), settled=1
        )

    def test_no_reset_a_microsecond_before(self) -> None:
        assert RULES.apply(guest(3), "u", Read(), SHORT_OF_DUE) == Outcome(guest(3))

    def test_a_full_balance_restarts_its_period_without_a_row(self) -> None:
        assert RULES.apply(guest(10), "u", Read(), DUE) == Outcome(guest(10, DUE))

    @pytest.mark.parametrize(
        ("change", "available"),
        [(Deduct(4), 6), (Refund(4), 10), (Upgrade(), 50)],
    )
    def test_a_due_reset_comes_before_every_change(
        self, change: Deduct | Refund | Upgrade, available: int
    ) -> None:
        outcome = RULES.apply(guest(3), "u", change, DUE)
        assert outcome.account.available == available
        assert outcome.entries[0] == Entry("reset", 7, "credits reset")
        assert not outcome.keyed(0)  # the due reset's row carries no key of the change
        assert all(outcome.keyed(index) for index in range(1, len(outcome.entries)))


class TestDeduct:
    def test_a_deduction_lowers_the_balance_with_a_negative_row(self) -> None:
        assert RULES.apply(guest(7), "u", Deduct(3, description="q"), T0) == Outcome(
            guest(4), (Entry("deduction", -3, "q"),)
        )

    def test_the_whole_balance_may_go(self) -> None:
        assert RULES.apply(guest(3), "u", Deduct(3), T0).account.available == 0

    def test_a_short_balance_is_refused_with_what_there_is(self) -> None:
        with pytest.raises(InsufficientCreditsError) as refused:
            RULES.apply(guest(2), "u", Deduct(3), T0)
        assert (refused.value.available, refused.value.required) == (2, 3)

    def test_a_repeated_key_changes_nothing_but_a_due_reset(self) -> None:
        first = Claim.of(Deduct(3))
        assert RULES.apply(guest(2), "u", Deduct(3), T0, claimed=first) == Outcome(guest(2))
        assert RULES.apply(guest(2), "u", Deduct(3), DUE, claimed=first).account == guest(10, DUE)


class TestReusedKey:
    """REUSED KEY: a key answers as a repeat only for the request it was first used for."""

    @pytest.mark.parametrize(
        "again",
        [Deduct(4), Deduct(3, description="other"), Refund(3)],
        ids=["another amount", "another description", "another operation"],
    )
    def test_another_request_under_a_claimed_key_is_refused(self, again: Deduct | Refund) -> None:
        with pytest.raises(IdempotencyKeyReusedError):
            RULES.apply(guest(5), "u", again, T0, claimed=Claim.of(Deduct(3)))

    def test_the_same_request_with_another_tier_is_a_repeat(self) -> None:
        # The tier names which budget an unseen account opens with, not what is asked.
        claimed = Claim.of(Deduct(3, is_guest=True))
        assert RULES.apply(guest(5), "u", Deduct(3, False), T0, claimed=claimed).entries == ()

    def test_a_description_of_null_text_is_not_no_description(self) -> None:
        assert Claim.of(Deduct(1, description="null")) != Claim.of(Deduct(1))

    def test_a_claim_whose_request_is_not_known_admits_its_operation_only(self) -> None:
        carried = Claim("refund", None)
        assert RULES.apply(guest(5), "u", Refund(9, "x"), T0, claimed=carried).entries == ()
        with pytest.raises(IdempotencyKeyReusedError):
            RULES.apply(guest(5), "u", Deduct(1), T0, claimed=carried)

    def test_a_key_claimed_for_nothing_keyed_is_refused(self) -> None:
        with pytest.raises(IdempotencyKeyReusedError):
            RULES.apply(guest(5), "u", Upgrade(), T0, claimed=Claim.of(Deduct(1)))


class TestRefund:
    def test_a_refund_gives_back_at_most_up_to_the_maximum(self) -> None:
        assert RULES.apply(guest(8), "u", Refund(5, "sorry"), T0) == Outcome(
            guest(10), (Entry("refund", 2, "sorry"),)
        )

    def test_a_refund_into_a_full_balance_writes_no_row(self) -> None:
        assert RULES.apply(guest(10), "u", Refund(5), T0) == Outcome(guest(10))


class TestUpgrade:
    def test_a_guest_gains_the_difference_of_the_maxima(self) -> None:
        assert RULES.apply(guest(3), "u", Upgrade(), T0) == Outcome(
            Account("u", False, 43, 50, T0), (Entry("upgrade", 40, "upgraded to registered"),)
        )

    def test_a_registered_account_is_left_as_it_is(self) -> None:
        member = Account("u", False, 7, 40, T0)  # registered under an earlier budget
        assert RULES.apply(member, "u", Upgrade(), T0) == Outcome(member)

    def test_the_balance_stays_within_the_registered_maximum(self) -> None:
        small = CreditRules(guest_max=10, registered_max=5, reset_period=timedelta(hours=24))
        assert small.apply(guest(3), "u", Upgrade(), T0).account.available == 0
        assert small.apply(guest(10), "u", Upgrade(), T0).account.available == 5


class TestReset:
    def test_a_reset_refills_now_and_restarts_the_period(self) -> None:
        later = T0 + timedelta(hours=1)
        assert RULES.apply(guest(4), "u", Reset(), later) == Outcome(
            guest(10, later), (Entry("reset", 6, "credits reset"),)
        )

    def test_a_due_reset_and_a_reset_write_one_row(self) -> None:
        assert RULES.apply(guest(4), "u", Reset(), DUE).entries == (
            Entry("reset", 6, "credits reset"),
        )


def test_the_account_shows_when_its_next_reset_is_due() -> None:
    shown = RULES.view(guest(4))
    assert (shown.available_credits, shown.max_credits, shown.next_reset_at) == (4, 10, DUE)


class TestErasedResumes:
    """ERASED RESUMES: an id erased before its next reset opens as it was erased."""

    def test_an_id_erased_with_no_reset_due_resumes_its_balance_with_the_spent_part(
        self,
    ) -> None:
        erased = guest(3)
        outcome = RULES.apply(None, "u", Deduct(1), T0, erased=erased)
        assert outcome.account == guest(2)
        assert outcome.entries == (
            Entry("deduction", -7, "spent before erasure"),
            Entry("deduction", -1, None),
        )
        assert not outcome.keyed(0) and outcome.keyed(1)

    def test_a_full_erased_balance_writes_no_row(self) -> None:
        assert RULES.apply(None, "u", Read(), T0, erased=guest(10)) == Outcome(guest(10))

    def test_once_the_reset_is_due_the_id_opens_with_a_full_budget(self) -> None:
        outcome = RULES.apply(None, "u", Read(False), DUE, erased=guest(3))
        assert outcome.account == Account("u", False, 50, 50, DUE)
        assert outcome.entries == ()

    def test_an_account_that_exists_ignores_an_erasure(self) -> None:
        assert RULES.apply(guest(5), "u", Read(), T0, erased=guest(1)).account == guest(5)
