"""The gRPC contract at the edge: validating what callers send and converting rows to messages."""
