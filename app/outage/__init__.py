"""Serving while the database is down (SPEC §9): the fallback, its journal on disk, the
snapshot of what the database last said, and the replay that carries the journal back."""
