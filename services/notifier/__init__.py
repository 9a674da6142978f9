"""The notifier: the gRPC JobEvents service that streams job status, progress and tokens to
clients (exactly, across reconnects and instances), and the webhook deliveries."""
