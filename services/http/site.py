"""The dashboard's routes on the HTTP service's listener.

`/` is the dashboard's page, `/static/…` its built assets (services/http/static/,
built from services/http/dashboard/ by `make dashboard` and checked in), and
`/dashboard/config.json` what the page needs to know of the server's settings (the
Jaeger UI's URL for trace links; nothing secret). The page talks to the public
HTTP API only, with the API key the person signs in with.

Its Content-Security-Policy allows scripts, styles, images and connections from
this origin only: no inline script or style, no other host, no framing.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from conveyor.core.config import Settings

STATIC_DIR = Path(__file__).with_name("static")
DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
PAGE_PATHS = ("/", "/dashboard/config.json")
STATIC_PREFIX = "/static/"


def is_dashboard(path: str) -> bool:
    """Whether a request path is one of the dashboard's (it gets DASHBOARD_CSP)."""
    return path in PAGE_PATHS or path.startswith(STATIC_PREFIX)


def add_routes(app: web.Application, settings: Settings) -> None:
    """Serve the dashboard at `/`, its assets under /static/, and its config."""
    index = STATIC_DIR / "index.html"
    config = {"jaegerUrl": settings.jaeger_url or None}

    async def page(request: web.Request) -> web.StreamResponse:
        if not index.exists():
            raise web.HTTPNotFound(reason="the dashboard is not built: run make dashboard")
        return web.FileResponse(index, headers={"Content-Type": "text/html; charset=utf-8"})

    async def dashboard_config(request: web.Request) -> web.Response:
        return web.json_response(config)

    app.router.add_get("/", page, allow_head=False)
    app.router.add_get("/dashboard/config.json", dashboard_config, allow_head=False)
    if STATIC_DIR.is_dir():
        app.router.add_static(STATIC_PREFIX, STATIC_DIR, append_version=False)
