"""`python -m services.notifier`: run the notifier until SIGTERM."""

from conveyor.server.runtime import run_service

from .app import serve


def main() -> None:
    run_service("notifier", serve)


if __name__ == "__main__":
    main()
