"""The query cache's tiers: a local copy per process in front of the shared store
(the database or Redis)."""
