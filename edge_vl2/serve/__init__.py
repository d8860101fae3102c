"""The OpenAI-compatible local server: one model per process, a bounded queue, offline by design.

    from edge_vl2.serve import ServeConfig, create_app
    app = create_app(vl2, ServeConfig())          # an ASGI app (Starlette); edge_vl2.serve.server runs it

Modules: config (limits and their defaults), schema (request validation), media (image URLs), engine (prompt
preparation and generation for one request), scheduler (queue + worker thread), routes (chat completions), responses
(OpenAI shapes + the `boxes` / `timings` extras), errors (OpenAI error JSON), app (the app, /health, /v1/models, API
key), server (uvicorn, binding, clean shutdown). Needs the `serve` extra (starlette, uvicorn).
"""

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name):
    if name == "ServeConfig":
        from .config import ServeConfig

        return ServeConfig
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
