"""`python -m services.gateway`: run the gateway until SIGTERM."""

from conveyor.runtime import run_service
from services.gateway.app import serve


def main() -> None:
    run_service("gateway", serve)


if __name__ == "__main__":
    main()
