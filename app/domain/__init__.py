"""The rules, as pure functions of state: credits, the one merge that carries state
between stores, the state a store holds of a user, the ledger audit, pseudonyms."""
