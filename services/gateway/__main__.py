"""`python -m services.gateway`: run the gateway until SIGTERM."""

from conveyor.core.config import get_settings
from conveyor.server.runtime import run_service

from .app import serve


def main() -> None:
    settings = get_settings()
    run_service(
        "gateway", serve, processes=settings.gateway_processes if settings.gateway_port else 1
    )


if __name__ == "__main__":
    main()
