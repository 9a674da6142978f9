"""What the service processes share at run time: start-up, gRPC servers, callers and webhooks."""
