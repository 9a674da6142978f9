"""The core every part shares: job states and their lifecycle, settings, errors, logs, metrics, tracing and prices."""
