"""The gateway: the gRPC JobService that accepts, reads, cancels and replays jobs."""
