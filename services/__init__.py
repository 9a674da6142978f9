"""The four Conveyor services: gateway, worker, notifier and dispatcher."""
