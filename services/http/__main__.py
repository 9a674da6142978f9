"""`python -m services.http`: run the HTTP/JSON API until SIGTERM."""

from conveyor.server.runtime import run_service

from .app import serve


def main() -> None:
    run_service("http", serve)


if __name__ == "__main__":
    main()
