"""The database's plumbing: the engine and its pool, TLS, a pooler in front, the
migrations run at start-up, and the guard (retries and the circuit breaker) around every
repository that talks to it."""
