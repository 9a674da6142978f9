"""The dispatcher: the control plane off the hot path — dead letters, timers, outbox, recovery."""
