"""The worker: consumes lane queues and runs each job's model call, many at once."""
