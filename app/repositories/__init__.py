"""Storage adapters: the in-memory store and the SQL store, behind one set of protocols."""
