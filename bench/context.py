"""What every section gets: the server, run lengths, the targets, the shared database."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench import fixtures
from bench.report import Targets
from bench.server import Databases, Server


@dataclass
class Context:
    server: Server
    databases: Databases
    quick: bool
    targets: Targets = field(default_factory=Targets)
    _main_url: str | None = None

    @property
    def duration(self) -> float:
        """Seconds measured per run."""
        return 1.0 if self.quick else 3.0

    @property
    def warmup(self) -> float:
        """Seconds run before measuring: pools fill, statements get prepared, plans settle."""
        return 0.3 if self.quick else 1.0

    async def main_db(self) -> str:
        """The database shared by the credits, http, cache and roundtrips sections, with the
        pool of many users and the hot user; created on first use."""
        if self._main_url is None:
            url = await self.databases.create("main")
            conn = await fixtures.connect(url)
            try:
                await fixtures.load_users(conn, fixtures.POOL_PREFIX, 0, fixtures.POOL_USERS)
                await fixtures.load_users(conn, "hot-", 0, 1)
                await fixtures.vacuum_analyze(conn)
            finally:
                await conn.close()
            self._main_url = url
        return self._main_url
