"""Integration tests: the real services against real RabbitMQ and Postgres."""
