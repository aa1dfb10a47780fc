"""PostgreSQL's own paths beside the SQL store's: the fast path's connections and single
statements, and the state repository's bulk statements on asyncpg."""
