"""Persistence layer of the AI shopping assistant: credits, consents and the query cache."""
