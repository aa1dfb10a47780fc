"""The system model-checked, not only a store (SPEC revision 3 §7, §9, §10).

A Hypothesis state machine drives two replicas, over HTTP, on one database (SQLite or
PostgreSQL) through deductions, refunds, keyed repeats and reuses, consents, erasures,
flips of the storage flag both ways, with and without carrying the state, a replica
following them, a shadow that misses writes and is repaired, outages of the database
(the outage fallback serving from memory and journaling) with a replica stopped and
started again during one, and export and import. Its reference model is the list of
every change a client was told was made (an acknowledged deduction or refund, a consent,
an erasure), with the store it was made in.

After each answer it checks what a client of one replica sees: while nothing another
replica or store did can have reached a user, the replica answers the balance its own
last answer and its changes since make (an outage and its end included: the fallback
starts from what the database last showed, and the database serves the user again only
once the outage's changes are in it). After recovery (the outage over, every journal
replayed, every replica on the database, carrying what its memory held), it checks what
the contract promises:

- every acknowledged change is in the books exactly once, under its key: a deduction at
  its amount, or clamped to what was left, and then counted (`clamped`); a refund at what
  it credited, or up to what it asked where the stores together had room (replicas on
  memory each see their own spending only); never twice;
- each balance is the model's (the opening, less and plus every acknowledged change since
  the user's erasure, if any, and what the erasure left) less only what the clamps took,
  and the ledger sums to it (the audit finds no drift);
- a key keeps its first request: repeated it is a replay, with another amount 422;
- of a user erased and not back since, nothing exists in the database or any replica's
  primary store, and the last acknowledged consent of any other stands;
- an export restored into an empty database gives back the same state, and imported
  again changes nothing.

`make model-check` runs it longer (MODEL_EXAMPLES, SYSTEM_STEPS).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import tempfile
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from app.main import create_app
from tests.conftest import DATABASES, app_settings, fresh_database
from tests.support.app_client import client_for
from tests.support.outage import DatabaseOutage, downable_database

T = TypeVar("T")
CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
SYSTEM_SETTINGS = settings(
    max_examples=int(os.environ.get("MODEL_EXAMPLES", "20")),
    stateful_step_count=int(os.environ.get("SYSTEM_STEPS", "25")),
    deadline=None,
    derandomize=CI,  # the same sequences on every CI run and every mutant
    database=None,
    suppress_health_check=list(HealthCheck),
    # An example starts two services: shrinking a failure takes minutes, so it is asked
    # for (MODEL_SHRINK=1); the failing sequence is printed either way.
    phases=[
        phase for phase in Phase if phase is not Phase.shrink or os.environ.get("MODEL_SHRINK")
    ],
)
ADMIN = {"Authorization": "Bearer test-admin-token"}
NDJSON = {**ADMIN, "Content-Type": "application/x-ndjson"}
CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"
OPENING = 10  # GUEST_MAX_CREDITS: every user here is a guest
REPLICAS = st.sampled_from(["a", "b"])
BACKENDS = st.sampled_from(["memory", "database"])
USERS = st.sampled_from(["ann", "bob"])
SETTINGS: dict[str, Any] = {
    "erasure_key": "erasure-key-for-the-system-model-0123",
    "db_outage_fallback": "memory",
    "storage_flag_poll_seconds": 3600,  # replicas follow when the machine says
    "erasure_poll_seconds": 3600,
    "db_retry_attempts": 1,
    "db_retry_max_seconds": 0.2,
    "db_breaker_failure_threshold": 1,
    "db_breaker_reset_seconds": 0.05,
    "outage_replay_retry_seconds": 3600,  # replays follow the database's answers, or recovery
    "db_connect_timeout": 1,
    "shadow_compare_rate": 1.0,
}
_keys = itertools.count()


@dataclass
class Change:
    """An acknowledged deduction or refund: its key, its amount as the answer showed it
    (the balance it moved), and the request it was made with."""

    user: str
    key: str
    amount: int  # signed: negative for a deduction
    asked: int  # the request's amount (positive)
    kind: str  # "deduction" or "refund"
    sequence: int  # when, among the model's events
    direct: bool  # made in the database itself, neither journaled nor carried there


@dataclass
class Replica:
    name: str
    journal: Path
    app: FastAPI | None = None
    client: httpx.AsyncClient | None = None
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    backend: str = "memory"
    shadow: str | None = None


class SystemMachine(RuleBasedStateMachine):
    request: ClassVar[pytest.FixtureRequest]
    kind: ClassVar[str]
    runner: ClassVar[asyncio.Runner]

    def __init__(self) -> None:
        super().__init__()
        self.sequence = 0
        self.changes: dict[str, Change] = {}  # acknowledged, by key
        self.unsure: set[str] = set()  # keys whose call was not answered (may have landed)
        self.erased_at: dict[str, int] = {}  # the sequence of each user's last erasure
        self.seen_applied: dict[str, set[str]] = {}  # keys a replica saw its database apply
        self.journaled: dict[str, set[str]] = {}  # keys a replica's outage journal holds
        self.consents: dict[str, tuple[int, bool]] = {}  # last acknowledged, per user
        self.known: dict[str, set[str]] = {}  # per store ("a", "b": memory; "db"), its keys
        self.outage = False
        self.stopped: set[str] = set()
        self.retired_clamps = 0  # counted by processes since stopped
        # (replica, user): the balance the replica last answered, while nothing else can
        # have changed what it serves of the user.
        self.views: dict[tuple[str, str], int] = {}
        self.outage_views: set[tuple[str, str]] = set()  # views first taken in the outage
        # Those once the outage is over, while the replica's fallback still serves the user
        # (its journal holds changes of theirs): the database's balance may differ.
        self.provisional: set[tuple[str, str]] = set()
        self.stack = AsyncExitStack()
        self.url, self.database = self.run(self._database())
        scratch = Path(tempfile.mkdtemp(prefix="system-"))
        self.replicas = {name: Replica(name, scratch / f"journal-{name}.db") for name in ("a", "b")}

    @initialize(backends=st.tuples(BACKENDS, BACKENDS))
    def start(self, backends: tuple[str, str]) -> None:
        """Each replica on the store it is configured with (no flag is stored yet)."""
        for replica, backend in zip(self.replicas.values(), backends, strict=True):
            replica.backend = backend
            self.run(self._start(replica))

    # Plumbing.

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(call)

    async def _database(self) -> tuple[str, DatabaseOutage]:
        await self.stack.__aenter__()
        return await self.stack.enter_async_context(downable_database(self.request, self.kind))

    async def _start(self, replica: Replica) -> None:
        backend = "memory" if replica.backend == "memory" else "database"
        values = {**SETTINGS, "outage_journal_path": replica.journal}
        app = create_app(app_settings(backend, self.url, **values))
        stack = AsyncExitStack()
        await stack.__aenter__()
        await stack.enter_async_context(app.router.lifespan_context(app))
        self.database.attach(app)
        replica.client = await stack.enter_async_context(client_for(app))
        replica.app, replica.stack = app, stack
        view = (await replica.client.get("/admin/storage", headers=ADMIN)).json()
        replica.backend, replica.shadow = view["backend"], view["shadow"]

    def client(self, name: str) -> httpx.AsyncClient:
        client = self.replicas[name].client
        assert client is not None
        return client

    def store_of(self, name: str) -> str:
        replica = self.replicas[name]
        return "db" if replica.backend == "database" else name

    def tick(self) -> int:
        self.sequence += 1
        return self.sequence

    def teardown(self) -> None:
        try:
            self.run(self._recover())
            self.run(self._check())
        finally:
            for replica in self.replicas.values():
                self.run(replica.stack.aclose())
            self.run(self.stack.aclose())

    # Rules: credits.

    @precondition(lambda self: len(self.stopped) < 2)
    @rule(name=REPLICAS, user=USERS, amount=st.integers(1, 4))
    def deduct(self, name: str, user: str, amount: int) -> None:
        self._change(name, user, amount, "deduct")

    @precondition(lambda self: len(self.stopped) < 2)
    @rule(name=REPLICAS, user=USERS, amount=st.integers(1, 3))
    def refund(self, name: str, user: str, amount: int) -> None:
        self._change(name, user, amount, "refund")

    def _change(self, name: str, user: str, amount: int, operation: str) -> None:
        if name in self.stopped:
            return
        key = f"{operation}-{next(_keys)}"
        client = self.client(name)
        waits = self._waits(name, user)
        provisional = self._provisional(name, user, waits)

        async def call() -> tuple[httpx.Response, int | None]:
            before = None
            if operation == "refund":  # what the refund credits is what the answer moved
                seen = await client.get(f"{CREDITS}/{user}")
                if seen.status_code != 200:
                    return seen, None
                before = seen.json()["available_credits"]
            body = {"amount": amount}
            response = await client.post(
                f"{CREDITS}/{user}/{operation}", json=body, headers={"Idempotency-Key": key}
            )
            return response, before

        response, before = self.run(call())
        assert response.status_code in (200, 402, 503), response.text
        view = self.views.get((name, user))
        if before is not None:
            self._saw(name, user, before, provisional)
        if response.status_code == 402 and view is not None:
            assert view < amount, f"{name} refused {amount} of {user}'s {view}"
        if response.status_code == 503:
            self.unsure.add(key)
            self._forget(user)
        if response.status_code != 200:
            return
        after = response.json()["available_credits"]
        moved = -amount if operation == "deduct" else after - (before or 0)
        if view is not None and operation == "deduct":
            assert after == view - amount, (
                f"{name} answered {after} for {user}, not {view}-{amount}"
            )
        kind = "deduction" if operation == "deduct" else "refund"
        journaled = (self.outage or waits) and self.store_of(name) == "db"
        direct = not journaled and self.store_of(name) == "db"
        self.changes[key] = Change(user, key, moved, amount, kind, self.tick(), direct)
        if journaled:  # in the replica's journal only
            self.journaled.setdefault(name, set()).add(key)
        else:
            self.known.setdefault(self.store_of(name), set()).add(key)
        self._forget(user, but=name)
        self._view(name, user, after, provisional)
        if direct:
            self.seen_applied.setdefault(name, set()).add(key)

    def _saw(self, name: str, user: str, balance: int, provisional: bool = False) -> None:
        """A balance the replica answered for the user: its last, where nothing else can
        have reached the user since."""
        view = self.views.get((name, user))
        if view is not None:
            assert balance == view, f"{name} shows {user} at {balance}, having said {view}"
        self._view(name, user, balance, provisional)

    def _waits(self, name: str, user: str) -> bool:
        """Does the replica's fallback serve the user, their changes waiting in its journal?"""
        app = self.replicas[name].app
        assert app is not None
        fallback = app.state.container.fallback
        return self.store_of(name) == "db" and fallback.waits(user)

    def _provisional(self, name: str, user: str, waits: bool) -> bool:
        """Is what the replica answers of the user now provisional: the fallback's, or the
        database's while another replica's journal still holds changes of the user (their
        replay will move the balance under this replica)?"""
        if not waits:
            self.provisional.discard((name, user))
        return (name, user) in self.provisional or self._others_wait(name, user)

    def _others_wait(self, name: str, user: str) -> bool:
        since = self.erased_at.get(user, 0)
        for other in self.replicas:
            if other == name:
                continue
            if other in self.stopped:  # its journal waits on disk for its next start
                keys = self.journaled.get(other, set())
                if any(
                    self.changes[key].user == user and self.changes[key].sequence > since
                    for key in keys
                ):
                    return True
            elif self._waits(other, user):
                return True
        return False

    def _view(self, name: str, user: str, balance: int, provisional: bool = False) -> None:
        if provisional:
            self.views.pop((name, user), None)
            return
        if self.outage and (name, user) not in self.views:
            # Taken in the outage, from the fallback's own start (a user it never saw
            # starts with a full budget): the database may hold other changes of the
            # user, so the view ends with the outage.
            self.outage_views.add((name, user))
        self.views[(name, user)] = balance

    def _forget(self, user: str | None = None, *, but: str | None = None) -> None:
        """What replicas last said of a user (None: of anyone) may have changed under them,
        but for replica `but`'s."""
        for name, seen in list(self.views):
            if name != but and (user is None or seen == user):
                del self.views[(name, seen)]

    def _keys_here(self, store: str, user: str, name: str | None = None) -> list[Change]:
        """The changes of the user whose keys the store holds (with a replica's `name` on
        the database: or its journal, not replayed yet, which only it serves from)."""
        here = self.known.get(store, set())
        if store == "db":
            here = here | self.journaled.get(name or "", set())
        since = self.erased_at.get(user, 0)
        return [
            change
            for key, change in self.changes.items()
            if key in here and change.user == user and change.sequence > since
        ]

    @precondition(lambda self: not self.stopped)
    @rule(name=REPLICAS, user=USERS, data=st.data())
    def repeat_or_reuse(self, name: str, user: str, data: st.DataObject) -> None:
        """A key the replica's store holds, sent again: the same request is a replay, any
        other is refused (REUSED KEY). During an outage, a key the replica saw the database
        apply before it: a replay too, or 503, never 402 and never charged again."""
        if self.outage:
            if self.replicas[name].backend != "database":
                return  # a replica on memory serves as it does with the database up
            seen = self.seen_applied.get(name, set())
            held = [c for c in self._keys_here("db", user) if c.key in seen]
        else:
            held = self._keys_here(self.store_of(name), user, name)
        if not held:
            return
        change = data.draw(st.sampled_from(held))
        same = data.draw(st.booleans())
        amount = change.asked if same else change.asked + 1
        operation = "deduct" if change.kind == "deduction" else "refund"
        provisional = self._provisional(name, user, self._waits(name, user))
        response = self.run(
            self.client(name).post(
                f"{CREDITS}/{user}/{operation}",
                json={"amount": amount},
                headers={"Idempotency-Key": change.key},
            )
        )
        if self.outage and response.status_code == 503:
            return
        if not same:
            assert response.status_code == 422, response.text
            return
        assert response.status_code == 200, response.text
        assert response.headers.get("Idempotent-Replayed") == "true"
        self._saw(name, user, response.json()["available_credits"], provisional)

    @precondition(lambda self: len(self.stopped) < 2)
    @rule(name=REPLICAS, user=USERS)
    def read(self, name: str, user: str) -> None:
        """A client reads the balance: what the replica serves of the user now."""
        if name in self.stopped:
            return
        provisional = self._provisional(name, user, self._waits(name, user))
        response = self.run(self.client(name).get(f"{CREDITS}/{user}"))
        assert response.status_code in (200, 503), response.text
        if response.status_code == 200:
            self._saw(name, user, response.json()["available_credits"], provisional)

    # Rules: consents and erasures.

    @precondition(lambda self: not self.stopped)
    @rule(name=REPLICAS, user=USERS, marketing=st.booleans())
    def consent(self, name: str, user: str, marketing: bool) -> None:
        body = {"terms_accepted": True, "marketing_consent": marketing}
        response = self.run(self.client(name).put(f"{CONSENTS}/{user}", json=body))
        assert response.status_code in (200, 503), response.text
        if response.status_code == 200:
            self.consents[user] = (self.tick(), marketing)

    @precondition(lambda self: not self.outage and not self.stopped)
    @rule(name=REPLICAS, user=USERS)
    def erase(self, name: str, user: str) -> None:
        response = self.run(self.client(name).delete(f"/api/v1/users/{user}"))
        assert response.status_code in (200, 404, 409, 503), response.text
        if response.status_code == 200:
            self.erased_at[user] = self.tick()
            self._forget(user)

    # Rules: moving state.

    @precondition(lambda self: not self.outage and not self.stopped)
    @rule(name=REPLICAS, carry=st.booleans())
    def flip(self, name: str, carry: bool) -> None:
        """The primary to the other store (with carry_state, or without it from the
        database to memory, which loses nothing: memory keeps what it held), a shadow
        dropped on the way."""
        replica = self.replicas[name]
        goal = "memory" if replica.backend == "database" else "database"
        carry = carry or goal == "database"
        body = {"backend": goal, "carry_state": carry}
        response = self.run(self.client(name).put("/admin/storage", json=body, headers=ADMIN))
        assert response.status_code in (200, 409, 503), response.text
        if response.status_code == 200:
            self._moved(replica, goal, None, carry)
            # Its own views hold where the database's state came to its memory.
            self._forget(but=name if carry and goal == "memory" else None)

    @precondition(lambda self: not self.outage and not self.stopped)
    @rule(name=REPLICAS)
    def follow(self, name: str) -> None:
        """The replica makes the change the other stored, carrying its own state as that
        change said (`carry_state`)."""
        replica = self.replicas[name]
        app = replica.app
        assert app is not None
        container = app.state.container
        if self.run(container.switching.follow_cluster()):
            stored = self.run(container.cluster.stored())
            storage = container.storage
            goal = storage.backend.value
            shadow = storage.shadow and storage.shadow.value
            self._moved(replica, goal, shadow, stored.carry_state)
            self._forget()

    def _moved(self, replica: Replica, goal: str, shadow: str | None, carry: bool) -> None:
        source = self.store_of(replica.name)
        replica.backend, replica.shadow = goal, shadow
        target = self.store_of(replica.name)
        if source != target:  # a new primary waited for the journal's replay (SPEC §9)
            self.known.setdefault("db", set()).update(self.journaled.pop(replica.name, set()))
        if carry and source != target:
            self.known.setdefault(target, set()).update(self.known.get(source, set()))

    @precondition(lambda self: not self.outage and not self.stopped)
    @rule(name=REPLICAS)
    def shadow_on(self, name: str) -> None:
        """The database as the shadow of a replica on memory (seeded from it)."""
        replica = self.replicas[name]
        if replica.backend != "memory" or replica.shadow is not None:
            return
        body = {"backend": "memory", "shadow": "database"}
        response = self.run(self.client(name).put("/admin/storage", json=body, headers=ADMIN))
        assert response.status_code in (200, 409, 503), response.text
        if response.status_code == 200:
            replica.shadow = "database"
            self._forget(but=name)

    @precondition(lambda self: not self.outage and not self.stopped)
    @rule(name=REPLICAS)
    def repair(self, name: str) -> None:
        app = self.replicas[name].app
        assert app is not None
        self.run(app.state.container.shadow.repair_now())
        self._forget(but=name)

    @precondition(lambda self: not self.outage and not self.stopped)
    @rule(name=REPLICAS)
    def export_import(self, name: str) -> None:
        """The primary's export imported back into it: nothing changes."""
        client = self.client(name)

        async def again() -> httpx.Response:
            exported = await client.get("/admin/state/export", headers=ADMIN)
            assert exported.status_code == 200
            return await client.post(
                "/admin/state/import", content=exported.content, headers=NDJSON
            )

        response = self.run(again())
        assert response.status_code in (200, 409, 503), response.text
        if response.status_code == 200:
            assert (response.json()["mismatches"], response.json()["ledger_rows_added"]) == (0, 0)

    # Rules: outages.

    @precondition(lambda self: not self.outage)
    @rule(looked=st.booleans())
    def outage_begins(self, looked: bool) -> None:
        """The database goes away; `looked`: each user had just looked at their balance
        on each replica (what the outage's checks then hold the fallback to)."""
        if looked:
            self._look()
        self.run(self.database.begin())
        self.outage = True

    @precondition(lambda self: self.outage)
    @rule(name=REPLICAS)
    def stop(self, name: str) -> None:
        """A replica on the database stops mid-outage (its journal stays on disk; what a
        replica on memory holds would go with it, by design, so those keep running)."""
        replica = self.replicas[name]
        if replica.backend != "database" or name in self.stopped:
            return
        self.retired_clamps += self._clamps_counted_by(replica)
        # What its memory held, and the keys it saw the database apply, go with it.
        self.known.pop(name, None)
        self.seen_applied.pop(name, None)
        self.run(replica.stack.aclose())
        replica.app = replica.client = None
        self.stopped.add(name)
        for seen in list(self.views):  # what it knew of the database went with it
            if seen[0] == name:
                del self.views[seen]

    @precondition(lambda self: self.outage)
    @rule(then=st.sampled_from(["nothing", "look", "flip a", "flip b"]))
    def outage_ends(self, then: str) -> None:
        """The database is back, and at once (before any replay but one a call sets off)
        `then`: each user looks at their balance on each replica, or an operator flips a
        replica's primary (and its users look at their balance there)."""
        self.run(self._back())
        if then == "look":
            self._look()
        elif then.startswith("flip"):
            name = then.split()[1]
            self.flip(name, carry=True)
            for user in ("ann", "bob"):
                self.read(name, user)

    def _look(self) -> None:
        for name, user in itertools.product(self.replicas, ("ann", "bob")):
            self.read(name, user)

    async def _back(self) -> None:
        await self.database.end()
        self.outage = False
        for seen in self.outage_views:
            self.views.pop(seen, None)
        self.provisional |= self.outage_views
        self.outage_views.clear()
        await asyncio.sleep(SETTINGS["db_breaker_reset_seconds"] * 2)
        for name in sorted(self.stopped):  # started again: it replays what it journaled
            await self._start(self.replicas[name])
        self.stopped.clear()
        for name in self.replicas:  # the replays follow the database's next answers
            await self._ready(name)

    async def _ready(self, name: str) -> None:
        """As an operator waits before moving state: /health/ready sees the database."""
        for _ in range(100):
            ready = (await self.client(name).get("/health/ready")).json()
            if ready["database"]["reachable"]:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"replica {name} does not see the database again: {ready}")

    async def _replayed(self, name: str) -> None:
        app = self.replicas[name].app
        assert app is not None
        fallback = app.state.container.fallback
        for _ in range(200):
            if not fallback.depth:
                return
            await fallback.replay()
            await asyncio.sleep(0.02)
        raise AssertionError(f"replica {name}'s journal not replayed: {fallback.figures}")

    # Recovery and the checks.

    async def _recover(self) -> None:
        if self.outage:
            await self._back()
        for name in self.replicas:
            await self._replayed(name)
            self.known.setdefault("db", set()).update(self.journaled.pop(name, set()))
        for name, replica in self.replicas.items():
            client = self.client(name)
            if replica.shadow is not None:
                body = {"backend": replica.backend}
                response = await client.put("/admin/storage", json=body, headers=ADMIN)
                assert response.status_code == 200, response.text
            if replica.backend == "database":  # memory may hold what it never carried
                flipped = await client.put(
                    "/admin/storage", json={"backend": "memory"}, headers=ADMIN
                )
                assert flipped.status_code == 200, flipped.text
            response = await client.put(
                "/admin/storage", json={"backend": "database"}, headers=ADMIN
            )
            assert response.status_code == 200, response.text
            assert response.json()["handover"]["mismatches"] == 0
            replica.backend, replica.shadow = "database", None
        for replica in self.replicas.values():
            assert replica.app is not None
            await replica.app.state.container.switching.follow_cluster()

    async def _check(self) -> None:
        client = self.client("a")
        lines = await _export(client)
        users = {line["user_id"] for line in lines if line["kind"] == "account"}
        rows: dict[str, list[dict[str, Any]]] = {}
        for line in lines:
            if line["kind"] == "ledger":
                rows.setdefault(line["user_id"], []).append(line)
        clamped = self._clamps_counted()
        clamped_rows = 0
        for user in ("ann", "bob"):
            since = self.erased_at.get(user, 0)
            acknowledged = [
                c for c in self.changes.values() if c.user == user and c.sequence > since
            ]
            held = rows.get(user, [])
            by_key: dict[str, list[dict[str, Any]]] = {}
            for row in held:
                if row["idempotency_key"] is not None:
                    by_key.setdefault(row["idempotency_key"], []).append(row)
                else:  # nothing but the opening an erased id resumes with (ERASED RESUMES)
                    assert since and row["description"] == "spent before erasure", row
            for change in acknowledged:  # exactly once, at its amount or clamped
                found = by_key.pop(change.key, [])
                assert len(found) <= 1, f"{change} twice: {found}"
                amount = found[0]["amount"] if found else 0
                if change.kind == "refund":
                    # What it credited, made in the database; carried there (from a
                    # replica's memory, its journal, or as a shadow's write), what the
                    # database's balance then had room for, never above what it asked
                    # (SPEC §3: never above max_credits; a replica on memory saw its own
                    # spending and refunds, not the others').
                    if change.direct:
                        assert amount == change.amount, (change, found)
                    assert 0 <= amount <= change.asked, (change, found)
                    continue
                if amount == change.amount:
                    continue
                clamped_rows += 1
                if found:
                    assert change.amount < found[0]["amount"] < 0, (change, found)
                    assert found[0]["description"].startswith(f"clamped from {change.asked}")
            unexpected = [key for key in by_key if key not in self.unsure]
            assert not unexpected, f"rows no acknowledged change explains: {unexpected}"
            if user in users:
                account = next(
                    line for line in lines if line["kind"] == "account" and line["user_id"] == user
                )
                assert account["available_credits"] == OPENING + sum(r["amount"] for r in held)
            consent = self.consents.get(user)
            seen = await client.get(f"{CONSENTS}/{user}")
            if consent is not None and consent[0] > since:
                assert seen.status_code == 200 and seen.json()["marketing_consent"] is consent[1]
            else:  # none recorded, or erased since
                assert seen.status_code == 404, seen.text
        assert clamped_rows <= clamped, f"{clamped_rows} clamped rows, {clamped} counted"
        audit = (await client.post("/admin/audit", headers=ADMIN)).json()
        assert audit["drifted"] == [], audit
        await self._keys_keep_their_request(client)
        await self._restores(lines)

    def _clamps_counted(self) -> int:
        """What every process counted: the running replicas' and those stopped before."""
        return self.retired_clamps + sum(map(self._clamps_counted_by, self.replicas.values()))

    @staticmethod
    def _clamps_counted_by(replica: Replica) -> int:
        assert replica.app is not None
        container = replica.app.state.container
        return container.carried.clamped + container.fallback.counts.clamped

    async def _keys_keep_their_request(self, client: httpx.AsyncClient) -> None:
        for change in self.changes.values():
            if change.sequence <= self.erased_at.get(change.user, 0):
                continue
            operation = "deduct" if change.kind == "deduction" else "refund"
            path = f"{CREDITS}/{change.user}/{operation}"
            headers = {"Idempotency-Key": change.key}
            same = await client.post(path, json={"amount": change.asked}, headers=headers)
            assert same.headers.get("Idempotent-Replayed") == "true", (change, same.text)
            other = await client.post(path, json={"amount": change.asked + 1}, headers=headers)
            assert other.status_code == 422, (change, other.text)

    async def _restores(self, lines: list[dict[str, Any]]) -> None:
        """The export into an empty database gives back the same; twice, nothing more."""
        body = "".join(json.dumps(line) + "\n" for line in lines).encode()
        async with fresh_database(self.request, self.kind) as url:
            app = create_app(app_settings("database", url, **SETTINGS))
            async with app.router.lifespan_context(app), client_for(app) as empty:
                for _ in range(2):
                    response = await empty.post("/admin/state/import", content=body, headers=NDJSON)
                    assert response.status_code == 200, response.text
                    assert response.json()["mismatches"] == 0
                assert _same(await _export(empty)) == _same(lines)


async def _export(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/admin/state/export", headers=ADMIN)
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def _same(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What two exports of the same state share: not ids, not the header's instant."""
    return [{k: v for k, v in line.items() if k != "id"} for line in lines[1:]]


@pytest.mark.parametrize("kind", DATABASES)
def test_no_acknowledged_change_is_lost_or_doubled_on_any_path(
    request: pytest.FixtureRequest, kind: str
) -> None:
    with asyncio.Runner() as runner:

        class Machine(SystemMachine):
            pass

        Machine.request, Machine.kind, Machine.runner = request, kind, runner
        run_state_machine_as_test(Machine, settings=SYSTEM_SETTINGS)
