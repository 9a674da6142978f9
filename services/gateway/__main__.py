"""`python -m services.gateway`: run the gateway until SIGTERM."""

from conveyor.config import get_settings
from conveyor.runtime import run_service
from services.gateway.app import serve


def main() -> None:
    settings = get_settings()
    run_service(
        "gateway", serve, processes=settings.gateway_processes if settings.gateway_port else 1
    )


if __name__ == "__main__":
    main()
