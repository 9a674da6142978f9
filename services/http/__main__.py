"""`python -m services.http`: run the HTTP/JSON API until SIGTERM."""

from conveyor.runtime import run_service
from services.http.app import serve


def main() -> None:
    run_service("http", serve)


if __name__ == "__main__":
    main()
