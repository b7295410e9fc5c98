"""The HTTP side of the service (aiohttp): ``/metrics`` and ``/healthz``.

The Scan Wajah page and its JSON gateway (:mod:`facesvc.transport.portal`) add their routes to
the same :class:`aiohttp.web.Application`, so one process serves both protocols; the
``/metrics`` guard is :func:`facesvc.transport.auth.http_auth_middleware`.
"""

from __future__ import annotations

from aiohttp import web

from facesvc.metrics import Metrics
from facesvc.serve.health import Health


def build_http_app(metrics: Metrics, health: Health) -> web.Application:
    """An application answering:

    - ``GET /metrics``: Prometheus text exposition of ``metrics``.
    - ``GET /healthz``: 200 ``{"status": "SERVING"}`` or 503
      ``{"status": "NOT_SERVING", "reason": "redis unreachable"}``, the same
      state the gRPC health service reports.
    """

    async def metrics_handler(request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        # aiohttp wants the charset apart from the media type.
        media_type, _, params = content_type.partition(";")
        charset = params.split("charset=")[-1].strip() if "charset=" in params else None
        return web.Response(body=body, content_type=media_type.strip(), charset=charset)

    async def healthz_handler(request: web.Request) -> web.Response:
        state = health.state
        if state.serving:
            return web.json_response({"status": "SERVING"})
        return web.json_response({"status": "NOT_SERVING", "reason": state.describe()}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz_handler)
    return app
