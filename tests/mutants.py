"""`make mutants`: named mutations of the credit code and SQL, each of which the tests
must catch. For each mutant a copy of the project gets one change (a guard dropped, a
due-reset step dropped, a sign flipped, a ledger insert or a key look-up dropped, the
refund cap dropped, …) and the tests relevant to it run there; the mutant is killed when
they fail. Prints killed/survived per mutant; exits 1 unless every mutant is killed.

A mutation names the text it replaces, after an anchor where that text is not unique:
a mutant whose text is no longer in the code is an error, not a pass, so the list cannot
rot silently. PostgreSQL comes from TEST_DATABASE_URL or a throwaway cluster started
once for the whole run (tests/support/postgres.py). Mutants run several at once (--jobs),
each in a pytest of its own on that one cluster, each session with its own template
database.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("app", "tests", "alembic.ini", "pyproject.toml")

DOMAIN = "app/domain/credits.py"
MEMORY = "app/repositories/memory.py"
GENERAL = "app/repositories/sql/credits.py"
STATEMENTS = "app/repositories/postgres/statements.py"
FAST = "app/repositories/postgres/credits.py"
FAST_CONNECTIONS = "app/repositories/postgres/connections.py"
SERVICE_CODE = "app/services/credits.py"
FALLBACK = "app/outage/fallback.py"
FALLBACK_STORES = "app/outage/stores.py"
REPLAY = "app/outage/replay.py"
CARRY = "app/domain/carry.py"
SWITCHER = "app/switching/switcher.py"
PRIVACY = "app/services/privacy.py"
STATE = "app/domain/state.py"
ROUTING = "app/switching/routing.py"
HANDOVER = "app/switching/handover.py"
SHADOW = "app/switching/shadow.py"
SQL_STATE = "app/repositories/sql/state.py"
CLUSTER = "app/switching/cluster_flag.py"
PG_STATE = "app/repositories/postgres/state.py"
ACCESS = "app/api/access.py"
LRU = "app/lru.py"
LRU_TESTS = ("tests/test_lru.py", "tests/test_local_cache.py")
METRICS = "app/ops/metrics.py"
OBSERVE = "app/api/observe.py"
METRICS_FAULT_TESTS = ("tests/test_metrics.py", "-k", "fault")
AUDIT = "app/domain/audit.py"
SQL_AUDIT = "app/repositories/sql/audit.py"
PG_STATE_TESTS = ("tests/test_pg_state.py", "tests/test_handover.py", "-k", "postgres")

MODEL = "tests/test_credit_model.py::test_the_credit_rules_hold_on_every_store"
SERVICE = "tests/test_credit_service.py"
RULES_TESTS = ("tests/test_credit_rules.py",)
AUDIT_TESTS = ("tests/test_ledger_audit.py",)
HANDOVER_TESTS = (
    "tests/test_state_rules.py",
    "tests/test_write_gate.py",
    "tests/test_handover.py",
)
RULES_OF_CARRY = ("tests/test_state_rules.py",)


def one_truth(*findings: int) -> tuple[str, ...]:
    """The HTTP regression tests of issue 26's findings (tests/test_one_truth.py), by node
    id, so that they combine with other tests without a `-k` that would filter those too."""
    module = "tests/test_one_truth.py"
    names = re.findall(r"^async def (test_(\d+)_\w+)\(", (ROOT / module).read_text(), re.M)
    return tuple(f"{module}::{name}" for name, n in names if int(n) in findings)


MEMORY_TESTS = (f"{SERVICE}", f"{MODEL}[memory]", "-k", "memory")
GENERAL_TESTS = (
    SERVICE,
    f"{MODEL}[sqlite]",
    f"{MODEL}[postgres-general]",
    "tests/test_concurrency.py",
    "-k",
    "sqlite or general",
)
FAST_TESTS = (
    SERVICE,
    "tests/test_concurrency.py",
    f"{MODEL}[postgres]",
    "tests/test_fast_path_connections.py::TestLostAnswers",
    "-k",
    "postgres and not general",
)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    anchor: str = ""  # the mutation applies to the first `original` after it

    def apply(self, root: Path) -> None:
        source = (root / self.path).read_text()
        start = source.index(self.anchor) if self.anchor else 0
        at = source.find(self.original, start)
        if at < 0 or (not self.anchor and source.count(self.original) != 1):
            raise LookupError(f"{self.name}: the text to mutate is not (once) in {self.path}")
        mutated = source[:at] + self.mutated + source[at + len(self.original) :]
        (root / self.path).write_text(mutated)


def _statement(name: str, anchor: str, original: str, mutated: str) -> Mutant:
    return Mutant(
        name, STATEMENTS, original, mutated, FAST_TESTS, anchor=f"\n{anchor} = Statement("
    )


MUTANTS = [
    # The rules themselves.
    Mutant(
        "rules: no due reset",
        DOMAIN,
        "elif account.last_reset <= self.reset_cutoff(now):",
        "elif False:",
        RULES_TESTS,
    ),
    Mutant(
        "rules: the due reset a tick late",
        DOMAIN,
        "elif account.last_reset <= self.reset_cutoff(now):",
        "elif account.last_reset < self.reset_cutoff(now):",
        RULES_TESTS,
    ),
    Mutant(
        "rules: a deduction may overdraw",
        DOMAIN,
        "if account.available < deduct.amount:",
        "if False:",
        RULES_TESTS,
    ),
    Mutant(
        "rules: a deduction's row has the wrong sign",
        DOMAIN,
        '_entry("deduction", -deduct.amount,',
        '_entry("deduction", deduct.amount,',
        RULES_TESTS,
    ),
    Mutant(
        "rules: a deduction adds",
        DOMAIN,
        "available=account.available - deduct.amount",
        "available=account.available + deduct.amount",
        RULES_TESTS,
    ),
    Mutant(
        "rules: no refund cap",
        DOMAIN,
        "credited = min(refund.amount, account.maximum - account.available)",
        "credited = refund.amount",
        RULES_TESTS,
    ),
    Mutant(
        "rules: a registered account upgraded again",
        DOMAIN,
        "if not account.is_guest:",
        "if False:",
        RULES_TESTS,
    ),
    Mutant(
        "rules: a repeated key applied again",
        DOMAIN,
        "if claimed is not None or isinstance(operation, Read):",
        "if isinstance(operation, Read):",
        RULES_TESTS,
    ),
    Mutant(
        "rules: a key reused with another amount or description answers as a repeat",
        DOMAIN,
        "self.request in (None, asked.request)",
        "True",
        RULES_TESTS,
    ),
    Mutant(
        "rules: a key reused for another operation answers as a repeat",
        DOMAIN,
        "return self.operation == asked.operation and",
        "return",
        RULES_TESTS,
    ),
    Mutant(
        "rules: a claim's digest leaves out the description",
        DOMAIN,
        "json.dumps([change.amount, change.description])",
        "json.dumps([change.amount])",
        RULES_TESTS,
    ),
    Mutant(
        "rules: an erased id opens with a fresh budget",
        DOMAIN,
        "if erased is None or erased.last_reset <= self.reset_cutoff(now):",
        "if True:",
        RULES_TESTS,
    ),
    Mutant(
        "rules: an erased id resumes even once its reset was due",
        DOMAIN,
        "if erased is None or erased.last_reset <= self.reset_cutoff(now):",
        "if erased is None:",
        RULES_TESTS,
    ),
    Mutant(
        "rules: a resumed account's spent part not on its ledger",
        DOMAIN,
        'return account, _entry("deduction", erased.available - erased.maximum, CARRIED_NOTE)',
        "return account, ()",
        RULES_TESTS,
    ),
    Mutant(
        "memory: an erased id not resumed",
        MEMORY,
        "erased = None if erasure is None else erasure.account",
        "erased = None",
        ("tests/test_privacy.py", "-k", "memory"),
    ),
    Mutant(
        "general: an erased id not resumed",
        GENERAL,
        "erased = None if before is not None else await self._erased(conn, user_id)",
        "erased = None",
        ("tests/test_privacy.py", "-k", "sqlite"),
    ),
    Mutant(
        "statements: CREATE opens an erased id with a fresh budget",
        STATEMENTS,
        "WHERE pseudonym = $13::varchar",
        "WHERE false",
        ("tests/test_privacy.py", "-k", "postgres"),
    ),
    Mutant(
        "erasure: descriptions kept on the pseudonymised ledger",
        "app/repositories/sql/state.py",
        ".values(user_id=pseudonym, description=None, idempotency_key=None)",
        ".values(user_id=pseudonym, idempotency_key=None)",
        ("tests/test_privacy.py", "-k", "postgres"),
    ),
    Mutant(
        "erasure: the consent history left behind (memory)",
        MEMORY,
        "events = data.consent_events.pop(user_id, None)",
        "events = data.consent_events.get(user_id)",
        ("tests/test_privacy.py", "-k", "memory"),
    ),
    Mutant(
        "rules: a reset writes no row",
        DOMAIN,
        'return after, _entry("reset", account.maximum - account.available, RESET_NOTE)',
        "return after, ()",
        RULES_TESTS,
    ),
    Mutant(
        "rules: rows of 0 written",
        DOMAIN,
        "return (Entry(kind, amount, description),) if amount else ()",
        "return (Entry(kind, amount, description),)",
        RULES_TESTS,
    ),
    Mutant(
        "rules: every account opens as a guest",
        DOMAIN,
        "return operation.is_guest if isinstance(operation, Read | Deduct) else True",
        "return True",
        RULES_TESTS,
    ),
    Mutant(
        "rules: the change's own row carries no key",
        DOMAIN,
        "return entry_index >= self.settled",
        "return False",
        RULES_TESTS,
    ),
    # The memory store.
    Mutant(
        "memory: keys never claimed",
        MEMORY,
        "data.keys[user_id][key] = (attempt.at, Claim.of(operation))",
        "pass",
        MEMORY_TESTS,
    ),
    Mutant(
        "memory: a key claimed without its request",
        MEMORY,
        "data.keys[user_id][key] = (attempt.at, Claim.of(operation))",
        "data.keys[user_id][key] = (attempt.at, Claim(Claim.of(operation).operation, None))",
        MEMORY_TESTS,
    ),
    Mutant(
        "memory: a replay not said to be one",
        MEMORY,
        "attempt.decided(claimed is not None)",
        "attempt.decided(False)",
        MEMORY_TESTS,
    ),
    Mutant(
        "memory: no bound on the users held",
        MEMORY,
        "if new and len(self.held) + len(new) > self.max_users:",
        "if False:",
        ("tests/test_memory_bounds.py",),
    ),
    Mutant(
        "memory: a new account not counted as held",
        MEMORY,
        "data.accounts[user_id] = outcome.account\n        data.held.add(user_id)",
        "data.accounts[user_id] = outcome.account",
        ("tests/test_memory_bounds.py",),
    ),
    Mutant(
        "memory: ledger rows dropped",
        MEMORY,
        "for index, entry in enumerate(outcome.entries):",
        "for index, entry in enumerate(()):",
        MEMORY_TESTS,
    ),
    Mutant(
        "memory: a merge writes its rows twice",
        MEMORY,
        "held.extend(replace(row, id=next(data.ids)) for row in plan.rows)",
        "held.extend(replace(row, id=next(data.ids)) for row in plan.rows + plan.rows)",
        HANDOVER_TESTS,
    ),
    # Moving state between stores.
    Mutant(
        "state: a moved key claimed for another operation",
        STATE,
        "return Claim(self.kind, None)",
        'return Claim("refund", None)',
        ("tests/test_state_stream.py", "-k", "sqlite"),
    ),
    Mutant(
        "import: a batch naming a user of the batch before merged alongside it",
        "app/transfer/imports.py",
        "len(merging) == MERGES_IN_FLIGHT or batch.follows",
        "len(merging) == MERGES_IN_FLIGHT",
        ("tests/test_import_staging.py", "-k", "waits_for_it"),
    ),
    Mutant(
        "state: equal rows counted once",
        STATE,
        "lacking.subtract(Counter(held))",
        "lacking = Counter(set(lacking) - set(held))",
        HANDOVER_TESTS,
    ),
    Mutant(
        "state: the earlier consent wins",
        STATE,
        "held.updated_at >= incoming.updated_at",
        "held.updated_at <= incoming.updated_at",
        HANDOVER_TESTS,
    ),
    Mutant(
        "state: a different balance verified",
        STATE,
        "if kept.available != account.available:",
        "if False:",
        HANDOVER_TESTS,
    ),
    Mutant(
        "handover: writes not held for the final step",
        ROUTING,
        "self._open.clear()",
        "pass",
        HANDOVER_TESTS,
    ),
    Mutant(
        "handover: users written during the copy not copied again",
        HANDOVER,
        "await copy_users(source, target, touched.take(), report)",
        "touched.take()",
        HANDOVER_TESTS,
    ),
    Mutant(
        "handover: the flag flipped despite a mismatch",
        HANDOVER,
        "if report.verification.mismatches:",
        "if False:",
        HANDOVER_TESTS,
    ),
    Mutant(
        "shadow: writes not repeated on the shadow",
        ROUTING,
        "answer = await shadow.credits.apply(user_id, operation, again)",
        "answer = primary",
        ("tests/test_shadow.py",),
    ),
    Mutant(
        "shadow: consent writes not repeated on the shadow",
        ROUTING,
        "shadow.consents.apply(user_id, change, now=now),",
        "asyncio.sleep(0, answer),",
        ("tests/test_shadow.py",),
    ),
    Mutant(
        "shadow: a difference not counted",
        SHADOW,
        "        self.mismatches += 1\n",
        "        return\n",
        ("tests/test_shadow.py",),
    ),
    Mutant(
        "shadow: a repair that fixed nothing leaves the queue",
        SHADOW,
        "if not differences(state, held[state.user_id]):",
        "if True:",
        ("tests/test_shadow.py",),
    ),
    Mutant(
        "pg state: a plan's keys not claimed",
        PG_STATE,
        "        await driver.execute(CLAIM_KEYS.sql, *map(list, zip(*keys, strict=True)))",
        "        pass",
        PG_STATE_TESTS,
    ),
    Mutant(
        "pg state: VERIFY compares the plans with themselves",
        PG_STATE,
        "return outcome(plans, await _read(driver, users, self._pseudonyms))",
        "return outcome(plans, [plan.expected for plan in plans])",
        PG_STATE_TESTS,
    ),
    Mutant(
        "pg import: a batch copied over ledger rows the store held",
        PG_STATE,
        "    if any(differing.values()):",
        "    if False:",
        PG_STATE_TESTS,
    ),
    Mutant(
        "pg import: a copied key claimed for another operation",
        PG_STATE,
        "(row[0], row[5], row[3], row[1], None)",
        "(row[0], row[5], row[3], 'refund', None)",
        ("tests/test_state_stream.py", "-k", "postgres and format_1"),
    ),
    Mutant(
        "pg import: a copied batch's ledger left out of VERIFY",
        PG_STATE,
        "if row[1:6] != expected[user_id] or more:",
        "if row[1:4] != expected[user_id][:3] or more:",
        PG_STATE_TESTS,
    ),
    Mutant(
        "pg import: a batch copied over an erasure the store holds",
        PG_STATE,
        "if recorded_as and await driver.fetchval(ANY_ERASED.sql, recorded_as):",
        "if False:",
        PG_STATE_TESTS,
    ),
    Mutant(
        "cluster: a newer stored flag not followed",
        CLUSTER,
        "if stored is None or stored.version <= self.version:",
        "if True:",
        ("tests/test_cluster_flag.py",),
    ),
    Mutant(
        "access: a user's JWT acts for any user",
        ACCESS,
        "if self.user_id is not None and user_id != self.user_id:",
        "if False:",
        ("tests/test_access.py",),
    ),
    Mutant(
        "metrics: a fault counting a credit call answers the call",
        METRICS,
        "        except Exception:\n            logger.exception(",
        "        except LookupError:\n            logger.exception(",
        METRICS_FAULT_TESTS,
    ),
    Mutant(
        "metrics: a fault counting a request reaches the server",
        OBSERVE,
        "                except Exception:\n",
        "                except LookupError:\n",
        METRICS_FAULT_TESTS,
    ),
    Mutant(
        "access: a user's JWT refunds",
        ACCESS,
        "        if not self.service:\n",
        "        if False:\n",
        ("tests/test_access.py",),
    ),
    Mutant(
        "access: a remembered token never expires",
        ACCESS,
        "if time.time() >= expires:",
        "if False:",
        ("tests/test_access.py",),
    ),
    Mutant(
        "lru: the most recent entry dropped past the bound",
        LRU,
        "entries.popitem(last=False)",
        "entries.popitem()",
        LRU_TESTS,
    ),
    Mutant(
        "lru: a look at an entry counts as its use",
        LRU,
        "return self._entries.get(key)",
        "return self.get(key)",
        LRU_TESTS,
    ),
    Mutant(
        "access: the client's tier over the JWT's",
        ACCESS,
        "return asked_guest if self.is_guest is None else self.is_guest",
        "return asked_guest",
        ("tests/test_access.py",),
    ),
    # The SQL general path.
    Mutant(
        "general: the account row not held",
        GENERAL,
        ".with_for_update()",
        "",
        GENERAL_TESTS,
    ),
    Mutant(
        "general: a racing first sight not decided again",
        GENERAL,
        "return created.first() is not None",
        "return True",
        GENERAL_TESTS,
    ),
    Mutant(
        "general: the decided account not written",
        GENERAL,
        "if after != before:",
        "if False:",
        GENERAL_TESTS,
    ),
    Mutant(
        "general: ledger rows dropped",
        GENERAL,
        "for index, entry in enumerate(outcome.entries):",
        "for index, entry in enumerate(()):",
        GENERAL_TESTS,
    ),
    Mutant(
        "general: no look-up of a claimed key",
        GENERAL,
        "claimed_keys.c.idempotency_key == attempt.key",
        'claimed_keys.c.idempotency_key == ""',
        GENERAL_TESTS,
    ),
    Mutant(
        "general: a key claimed without its request",
        GENERAL,
        "request=claim.request,",
        "request=None,",
        GENERAL_TESTS,
    ),
    Mutant(
        "general: a replay not said to be one",
        GENERAL,
        "attempt.decided(claimed is not None)",
        "attempt.decided(False)",
        GENERAL_TESTS,
    ),
    Mutant(
        "general: no look-up of an own key on the ledger",
        GENERAL,
        "if not attempt.sent:",
        "if True:",
        GENERAL_TESTS,
    ),
    # PostgreSQL's statements.
    _statement(
        "statements: READ without its reset guard",
        "READ",
        "AND last_reset_timestamp > $2::timestamptz",
        "AND $2::timestamptz IS NOT NULL",
    ),
    _statement(
        "statements: DEDUCT without its balance guard",
        "DEDUCT",
        "AND available_credits >= $4::integer",
        "AND $4::integer IS NOT NULL",
    ),
    _statement(
        "statements: DEDUCT without its reset guard",
        "DEDUCT",
        "AND last_reset_timestamp > $3::timestamptz",
        "AND $3::timestamptz IS NOT NULL",
    ),
    _statement(
        "statements: DEDUCT's row with the wrong sign",
        "DEDUCT",
        "'deduction', -$4::integer",
        "'deduction', $4::integer",
    ),
    _statement(
        "statements: DEDUCT writes no row",
        "DEDUCT",
        "      FROM changed\n)",
        "      FROM changed WHERE false\n)",
    ),
    _statement(
        "statements: DEDUCT claims no key",
        "DEDUCT",
        "SELECT user_id, $6::varchar, $2::timestamptz, 'deduction', $7::varchar FROM changed",
        "SELECT user_id, $6::varchar, $2::timestamptz, 'deduction', $7::varchar FROM changed"
        " WHERE false",
    ),
    _statement(
        "statements: DEDUCT claims its key without the request",
        "DEDUCT",
        "'deduction', $7::varchar FROM changed",
        "'deduction', NULL FROM changed",
    ),
    _statement(
        "statements: DEDUCT_OWN_KEY without its balance guard",
        "DEDUCT_OWN_KEY",
        "AND available_credits >= $4::integer",
        "AND $4::integer IS NOT NULL",
    ),
    _statement(
        "statements: DEDUCT_OWN_KEY without its reset guard",
        "DEDUCT_OWN_KEY",
        "AND last_reset_timestamp > $3::timestamptz",
        "AND $3::timestamptz IS NOT NULL",
    ),
    _statement(
        "statements: DEDUCT_OWN_KEY writes no row",
        "DEDUCT_OWN_KEY",
        "      FROM changed\n)",
        "      FROM changed WHERE false\n)",
    ),
    _statement(
        "statements: REFUND without its reset guard",
        "REFUND",
        "AND last_reset_timestamp > $3::timestamptz",
        "AND $3::timestamptz IS NOT NULL",
    ),
    _statement(
        "statements: REFUND without its cap",
        "REFUND",
        "LEAST(a.available_credits + $4::integer, a.max_credits)",
        "a.available_credits + $4::integer",
    ),
    _statement(
        "statements: REFUND writes no row",
        "REFUND",
        "WHERE credited <> 0",
        "WHERE false",
    ),
    _statement(
        "statements: REFUND claims no key",
        "REFUND",
        "SELECT user_id, $6::varchar, $2::timestamptz, 'refund', $7::varchar FROM changed",
        "SELECT user_id, $6::varchar, $2::timestamptz, 'refund', $7::varchar FROM changed"
        " WHERE false",
    ),
    _statement(
        "statements: REFUND claims its key as a deduction's",
        "REFUND",
        "'refund', $7::varchar FROM changed",
        "'deduction', $7::varchar FROM changed",
    ),
    _statement(
        "statements: UPGRADE without its reset guard",
        "UPGRADE",
        "AND last_reset_timestamp > $3::timestamptz",
        "AND $3::timestamptz IS NOT NULL",
    ),
    _statement(
        "statements: UPGRADE of a registered account",
        "UPGRADE",
        "WHERE a.user_id = b.user_id AND a.is_guest",
        "WHERE a.user_id = b.user_id",
    ),
    _statement(
        "statements: UPGRADE writes no row",
        "UPGRADE",
        "WHERE gained <> 0",
        "WHERE false",
    ),
    _statement(
        "statements: UPGRADE answers a registered account due for a reset",
        "UPGRADE",
        "AND NOT is_guest AND last_reset_timestamp > $3::timestamptz",
        "AND NOT is_guest AND $3::timestamptz IS NOT NULL",
    ),
    _statement(
        "statements: RESET does not restart the period",
        "RESET",
        "last_reset_timestamp = $2::timestamptz,",
        "last_reset_timestamp = a.last_reset_timestamp,",
    ),
    _statement(
        "statements: RESET writes no row",
        "RESET",
        "WHERE refill <> 0",
        "WHERE false",
    ),
    _statement(
        "statements: CREATE writes no row",
        "CREATE",
        "WHERE $6::varchar IS NOT NULL",
        "WHERE $6::varchar IS NULL",
    ),
    _statement(
        "statements: CREATE claims no key",
        "CREATE",
        "WHERE $10::varchar IS NOT NULL",
        "WHERE $10::varchar IS NULL",
    ),
    _statement(
        "statements: CREATE claims its key without the request",
        "CREATE",
        "$11::varchar, $12::varchar",
        "$11::varchar, NULL",
    ),
    Mutant(
        "statements: ADMISSION answers an account due for a reset",
        STATEMENTS,
        "AND a.last_reset_timestamp > $2::timestamptz",
        "AND $2::timestamptz IS NOT NULL",
        ("tests/test_assistant_flow.py", "-k", "postgres and not general"),
        anchor="\nADMISSION = Statement(",
    ),
    _statement(
        "statements: HISTORY out of order within an instant",
        "HISTORY",
        "ORDER BY timestamp DESC, id DESC",
        "ORDER BY timestamp DESC, id ASC",
    ),
    # What travels with a call, and the outage fallback.
    Mutant(
        "service: a deduction without a client key gets no key of its own",
        SERVICE_CODE,
        "attempt = Attempt(self._clock(), _own_key(), own_key=True)",
        "attempt = Attempt(self._clock())",
        ("tests/test_fast_path_connections.py::TestLostAnswers",),
    ),
    Mutant(
        "service: a replay not said to be one",
        SERVICE_CODE,
        "return Applied(account, bool(attempt.replayed))",
        "return Applied(account, False)",
        (f"{MODEL}[memory]", "tests/test_api_credits.py", "-k", "memory"),
    ),
    Mutant(
        "fallback: a change served during an outage not journaled",
        FALLBACK,
        "await self._journaled(CreditChange(user_id, operation, attempt), unavailable)",
        "pass",
        ("tests/test_fallback.py",),
    ),
    Mutant(
        "fallback: a consent change served during an outage not journaled",
        FALLBACK,
        "await self._journaled(_journal_record(user_id, change, now, consent), unavailable)",
        "pass",
        ("tests/test_fallback.py",),
    ),
    Mutant(
        "fallback: a marketing change journaled without its consent's terms",
        FALLBACK,
        "terms, version = consent.terms_accepted, consent.terms_version",
        "terms, version = None, None",
        ("tests/test_fallback.py",),
    ),
    Mutant(
        "fallback: an outage starts each user afresh, not as last seen",
        FALLBACK,
        "self._data.adopt(user_id, seen.account, seen.consent)",
        "pass",
        ("tests/test_fallback.py",),
    ),
    Mutant(
        "replay: a database that cannot take changes has them all moved aside",
        REPLAY,
        "if _database_fault(refused):",
        "if False:",
        ("tests/test_fallback.py",),
    ),
    Mutant(
        "replay: an unreadable record stops the replay",
        REPLAY,
        "except ValueError as unreadable:",
        "except LookupError as unreadable:",
        ("tests/test_fallback.py", "-k", "unreadable"),
    ),
    Mutant(
        "fallback: an unreadable record stops the start",
        FALLBACK,
        "with contextlib.suppress(ValueError):",
        "with contextlib.suppress(LookupError):",
        ("tests/test_fallback.py", "-k", "unreadable"),
    ),
    Mutant(
        "replay: a refused batch moved aside whole",
        REPLAY,
        "        if len(entries) == 1:",
        "        if True:",
        ("tests/test_fallback.py",),
    ),
    # The one merge (app/domain/carry.py), each rule undone, and each fix of issue 26
    # undone where two paths meet (tests/test_one_truth.py, finding by finding).
    Mutant(
        "carry: a follower's hand-over undoes a later write (finding 1)",
        CARRY,
        "elif account is not None and carried.account is not None and not self._own_changes():",
        "elif account is not None and carried.account is not None:",
        (*RULES_OF_CARRY, *one_truth(1)),
    ),
    Mutant(
        "carry: a key on another row taken for the same history",
        CARRY,
        "elif row.idempotency_key not in keys or rows.get(row.idempotency_key, row) != row:",
        "elif row.idempotency_key not in keys:",
        RULES_OF_CARRY,
    ),
    Mutant(
        "carry: a change the store holds by its key applied again",
        CARRY,
        "        if credit.key is not None:\n            return self._known_key(credit)",
        "        if False:\n            return self._known_key(credit)",
        (*RULES_OF_CARRY, "tests/test_fallback.py"),
    ),
    Mutant(
        "carry: a key carried twice applied twice",
        CARRY,
        "            if known is not None:\n                fates[index] = known",
        "            if False:\n                fates[index] = known",
        RULES_OF_CARRY,
    ),
    Mutant(
        "carry: a deduction that no longer fits clamped to nothing",
        CARRY,
        "            clamped_to = short.available\n",
        "            clamped_to = 0\n",
        (*RULES_OF_CARRY, "tests/test_faults.py", "-k", "clamped"),
    ),
    Mutant(
        "carry: a clamped row without a key carried again",
        CARRY,
        "            key = clamp_key(credit.row)  # CLAMP: known by it from now on",
        "            key = None",
        RULES_OF_CARRY,
    ),
    Mutant(
        "carry: a refill the store made since made again",
        CARRY,
        "if refill and account is not None and account.last_reset >= credit.at:",
        "if False:",
        (*RULES_OF_CARRY, "tests/test_fallback.py"),
    ),
    Mutant(
        "carry: a change made before its user's erasure carried (findings 4, 7)",
        CARRY,
        "if self.erased_at is not None and credit.at <= self.erased_at:",
        "if False:",
        (*RULES_OF_CARRY, *one_truth(4, 7)),
    ),
    Mutant(
        "carry: an erased user's account taken as carried (finding 4)",
        CARRY,
        "return self.erased_at is None or (known is not None and known >= self.erased_at)",
        "return True",
        (*RULES_OF_CARRY, *one_truth(4)),
    ),
    Mutant(
        "carry: an erased user's consent carried",
        CARRY,
        "            and not self._erased(incoming.updated_at)\n",
        "",
        (*RULES_OF_CARRY, *one_truth(4)),
    ),
    Mutant(
        "carry: a change beyond the horizon carried onto a held account",
        CARRY,
        "if row is not None and account is not None and credit.at < self.horizon:",
        "if False:",
        RULES_OF_CARRY,
    ),
    Mutant(
        "carry: an opening row carried as a deduction",
        CARRY,
        '    return row.kind == "deduction" and unkeyed and row.description == CARRIED_NOTE',
        "    return False",
        RULES_OF_CARRY,
    ),
    Mutant(
        "carry: a key the store holds for another request counted as the same",
        CARRY,
        "if known is not None and credit.claim is not None and not _same(known, credit.claim):",
        "if False:",
        (*RULES_OF_CARRY, "tests/test_fallback.py"),
    ),
    Mutant(
        "carry: a journaled consent change stands over a later one",
        CARRY,
        "    if current is not None and current.updated_at >= change.at:\n",
        "    if False:\n",
        (*RULES_OF_CARRY, "tests/test_fallback.py"),
    ),
    Mutant(
        "carry: a consent event carried again",
        CARRY,
        "self.events = missing(events + added, held.events)",
        "self.events = events + added",
        (*RULES_OF_CARRY, "tests/test_fallback.py", *one_truth(8)),
    ),
    Mutant(
        "carry: claimed keys not carried (finding 8)",
        CARRY,
        "            self.keys.append(record)\n            planned.add(record.key)",
        "            planned.add(record.key)",
        (*RULES_OF_CARRY, *one_truth(8)),
    ),
    Mutant(
        "recovery: the database serves a user whose journal waits (finding 2)",
        FALLBACK_STORES,
        "        if fallback.waits(user_id) and await fallback.still_waits(user_id):\n"
        "            return await fallback.credits(",
        "        if False:\n            return await fallback.credits(",
        one_truth(2),
    ),
    Mutant(
        "recovery: a change of primary while the journal waits (finding 3)",
        SWITCHER,
        "            if backend is not old:\n                await self._journal_replayed()",
        "            if False:\n                await self._journal_replayed()",
        one_truth(3),
    ),
    Mutant(
        "recovery: the fallback store outlives its outage (finding 5)",
        FALLBACK,
        "        elif self._data.held:\n",
        "        elif False:\n",
        one_truth(5),
    ),
    Mutant(
        "recovery: an erased user kept in the fallback store (finding 5)",
        FALLBACK,
        "        self._data.forget(user_id)",
        "        pass",
        one_truth(5),
    ),
    Mutant(
        "recovery: a key the database applied before the outage charged again (finding 6)",
        FALLBACK,
        "if self._applied_before(user_id, operation, attempt):",
        "if False:",
        one_truth(6),
    ),
    Mutant(
        "recovery: a client's key short in an outage answered 402 (finding 6)",
        FALLBACK,
        "if attempt.key is not None and not attempt.own_key:",
        "if False:",
        one_truth(6),
    ),
    Mutant(
        "export: no erasure lines (finding 8)",
        "app/transfer/export.py",
        "        yield ENCODER.encode_lines([_erasure_line(record) for record in records])",
        "        yield b''",
        one_truth(8),
    ),
    Mutant(
        "erasure: an id erased before is not found again",
        PRIVACY,
        "        if not state.empty or state.erasure is not None:",
        "        if not state.empty:",
        (*one_truth(8), "tests/test_privacy.py"),
    ),
    Mutant(
        "erasure: not recorded where nothing of the user is held (finding 9)",
        SQL_STATE,
        "            statement = insert(conn, erasures).values(pseudonym=pseudonym, erased_at=now)",
        "            return None",
        one_truth(9),
    ),
    Mutant(
        "replay: a connection lost under a merge taken for a refusal (finding 10)",
        PG_STATE,
        "                if not driver.is_closed():\n                    raise\n",
        "                raise\n",
        one_truth(10),
    ),
    Mutant(
        "recovery: a process started in an outage knows no key its replay landed (finding 11)",
        FALLBACK,
        "self.last_known.saw_state(self._rules.view(state.account), state.keys)",
        "self.last_known.saw_credits(self._rules.view(state.account))",
        one_truth(11),
    ),
    Mutant(
        "recovery: a waiting user served by the fallback with the database back (finding 12)",
        FALLBACK_STORES,
        "        if fallback.waits(user_id) and await fallback.still_waits(user_id):\n"
        "            return await fallback.credits(",
        "        if fallback.waits(user_id):\n            return await fallback.credits(",
        one_truth(12),
    ),
    Mutant(
        "erasure: a carried record leaves the user held (memory)",
        MEMORY,
        "        return await erase_held(self, self._pseudonyms, new)",
        "        return 0",
        one_truth(8),
    ),
    Mutant(
        "assistant: a query that waited shows the account read before the wait",
        "app/services/assistant.py",
        "credits=await self._account(user_id, is_guest))",
        "credits=account or await self._account(user_id, is_guest))",
        ("tests/test_assistant_flow.py",),
    ),
    # The fast path's own decisions.
    Mutant(
        "fast path: a retry of an own key sent on the fast path again",
        FAST,
        "if attempt.sent:  # may have been applied",
        "if False:  # may have been applied",
        FAST_TESTS,
    ),
    Mutant(
        "fast path: a refusal on first sight trusted for an account that exists",
        FAST,
        "return None  # refused if the account is new",
        "raise  # refused if the account is new",
        FAST_TESTS,
    ),
    Mutant(
        "fast path: a claimed key's abort raised, not declined",
        FAST,
        "except asyncpg.UniqueViolationError:  # the key's primary key: claimed before\n"
        "            return None",
        "except asyncpg.UniqueViolationError:  # the key's primary key: claimed before\n"
        "            raise",
        FAST_TESTS,
    ),
    Mutant(
        "fast path: a call finding every connection busy declined at once, not given a turn",
        FAST_CONNECTIONS,
        "        self._waiting.append(turn)\n",
        "        return None\n",
        ("tests/test_fast_path_connections.py::TestTurns",),
    ),
    Mutant(
        "fast path: a connection released to the idle ones while calls wait their turn",
        FAST_CONNECTIONS,
        "        if not self._pass_on(held):\n            self._idle.append(held)",
        "        self._idle.append(held)",
        ("tests/test_fast_path_connections.py::TestTurns",),
    ),
    # The ledger audit (SPEC §11).
    Mutant(
        "audit: the opening ignores an upgrade",
        AUDIT,
        "return available == maximum - rows.upgrades + rows.total",
        "return available == maximum + rows.total",
        AUDIT_TESTS,
    ),
    Mutant(
        "audit: a disagreement past the horizon judged as consistent",
        AUDIT,
        "and figures.last_refill < horizon:\n        return Verdict.UNVERIFIABLE",
        "and figures.last_refill < horizon:\n        return Verdict.CONSISTENT",
        AUDIT_TESTS,
    ),
    Mutant(
        "audit: checked from the last refill row, not the first held",
        AUDIT,
        "point = min(refills)",
        "point = max(refills)",
        AUDIT_TESTS,
    ),
    Mutant(
        "audit: the rows since a refill include its own row (memory)",
        AUDIT,
        "if row.id > point]",
        "if row.id >= point]",
        AUDIT_TESTS,
    ),
    Mutant(
        "audit: the rows since a refill include its own row (SQL)",
        SQL_AUDIT,
        "ledger.c.id > batch.c.refill_row,",
        "ledger.c.id >= batch.c.refill_row,",
        AUDIT_TESTS,
    ),
    Mutant(
        "audit: the rows since a refill by when stamped, not applied (memory)",
        AUDIT,
        "if row.id > point]",
        "if row.timestamp > account.last_reset]",
        AUDIT_TESTS,
    ),
    Mutant(
        "audit: the rows since a refill by when stamped, not applied (SQL)",
        SQL_AUDIT,
        "ledger.c.id > batch.c.refill_row,",
        "ledger.c.timestamp > batch.c.last_reset_timestamp,",
        AUDIT_TESTS,
    ),
]


def _copy(into: Path) -> Path:
    root = into / "project"
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.db", "*.db-*")
    root.mkdir(parents=True)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)
    return root


def _pytest(root: Path, tests: tuple[str, ...], env: dict[str, str]) -> tuple[int, str]:
    """pytest's exit code (1: tests failed) and the end of what it printed."""
    # Not behind PgBouncer: the same statements and rules as on PostgreSQL, at more cost.
    skip = ["-m", "not pgbouncer"]
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *skip, *tests]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
    return done.returncode, "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])


def _environment() -> tuple[dict[str, str], object | None]:
    """The children's environment, with a PostgreSQL for all of them."""
    env = {**os.environ, "CI": "true", "REQUIRE_POSTGRES": "1", "MODEL_EXAMPLES": "25"}
    if env.get("TEST_DATABASE_URL"):
        return env, None
    sys.path.insert(0, str(ROOT))
    from tests.support.postgres import start_postgres

    server = start_postgres()
    env["TEST_DATABASE_URL"] = server.admin_url
    return env, server


def _run(mutant: Mutant, env: dict[str, str]) -> bool:
    """Applies `mutant` to a copy of the project and runs its tests there; prints the
    verdict (and the tests' output unless they failed); True when killed."""
    started = time.monotonic()
    output = ""
    with tempfile.TemporaryDirectory(prefix="mutant-") as place:
        root = _copy(Path(place))
        try:
            mutant.apply(root)
        except LookupError as stale:
            killed, verdict = False, f"ERROR ({stale})"
        else:
            code, output = _pytest(root, mutant.tests, env)
            killed = code == 1  # tests ran and failed
            verdict = {0: "SURVIVED", 1: "killed"}.get(code, f"ERROR (exit {code})")
    report = f"{verdict:<10} {time.monotonic() - started:5.1f} s  {mutant.name}"
    print(report if killed or not output else f"{output}\n{report}", flush=True)
    return killed


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__)
    parser.add_argument("-k", default="", help="only the mutants whose name contains this")
    parser.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("MUTANT_JOBS", 2 * (os.cpu_count() or 1))),
        help="mutants run at once, each in its own pytest (MUTANT_JOBS; twice the CPUs: "
        "much of a run waits on the database)",
    )
    args = parser.parse_args()
    chosen = [mutant for mutant in MUTANTS if args.k in mutant.name]
    env, server = _environment()
    failures = 0
    try:
        with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
            pristine = _copy(Path(scratch) / "pristine")
            everything = tuple(
                sorted({t for m in chosen for t in m.tests if t.startswith("tests")})
            )
            code, output = _pytest(pristine, everything, env)
            if code != 0:
                print(f"{output}\nthe tests fail without any mutation: nothing to learn")
                return 1
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                for killed in pool.map(lambda mutant: _run(mutant, env), chosen):
                    failures += not killed
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
    print(f"{len(chosen) - failures} of {len(chosen)} mutants killed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
