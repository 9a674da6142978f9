"""`python -m services.dispatcher`: run the dispatcher until SIGTERM."""

from conveyor.server.runtime import run_service

from .app import serve


def main() -> None:
    run_service("dispatcher", serve)


if __name__ == "__main__":
    main()
