"""`python -m services.dispatcher`: run the dispatcher until SIGTERM."""

from conveyor.runtime import run_service
from services.dispatcher.app import serve


def main() -> None:
    run_service("dispatcher", serve)


if __name__ == "__main__":
    main()
