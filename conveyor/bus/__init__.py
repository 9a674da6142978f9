"""The message bus (RabbitMQ): topology, publishing jobs, events, control messages and catch-up."""
