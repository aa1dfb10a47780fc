"""What an operator runs and reads: metrics and the metered credit calls, health, the
ledger audit, retention."""
