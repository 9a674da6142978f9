"""Postgres access: the schema, the engine, and the job state transitions."""
