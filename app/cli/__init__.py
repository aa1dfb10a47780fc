"""The commands of `python -m app` beside serving: state export and import, the ledger
audit, the outage journal's replay."""
