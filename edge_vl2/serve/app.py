"""The server as an ASGI app (Starlette): build it around a loaded pipeline, or around a loader it runs in the
background so /health answers "loading" while a bundle is verified and repacked.

    from edge_vl2.serve import ServeConfig, create_app
    app = create_app(VL2Pipeline.from_bundle("tiny-int4"), ServeConfig(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # or edge_vl2.serve.server.serve_app(app, ...)

Routes: POST /v1/chat/completions (routes.py), GET /v1/models, GET /v1/models/{id}, GET /health. Every error is
OpenAI's error JSON (errors.py). With `api_key`, every route but /health needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import UserError, one_line
from .config import ServeConfig
from .engine import run_job
from .errors import ApiError, unavailable
from .responses import error_response, model, models
from .routes import chat_completions
from .scheduler import Scheduler, fix_mmap_threshold

log = logging.getLogger("edge_vl2.serve")


class ServeState:
    """What every route reads: status (loading / ready / failed / stopping), the pipeline, the scheduler."""

    def __init__(self, config: ServeConfig, model_id: str, on_load_failure: Callable[[str], None] | None = None):
        self.config, self.model_id, self.on_load_failure = config, model_id, on_load_failure
        self.status, self.error = "loading", None
        self.vl2 = self.scheduler = None
        self.loading: threading.Thread | None = None  # the background loader, when there is one
        self.created = int(time.time())
        self.stop_server: Callable[[], None] = lambda: None  # serve_app sets it: ends the process's server

    def ready(self, vl2) -> None:
        if vl2.vision_cache is None and self.config.vision_cache_mb:
            vl2.enable_vision_cache(self.config.vision_cache_mb)
        self.vl2 = vl2
        fix_mmap_threshold()  # before the first request: a steady RSS
        self.scheduler = Scheduler(lambda job: run_job(vl2, job), self.config.max_queue, self.config.retry_after_s)
        if self.config.special_tokens != "parse":
            vl2.tokenizer.encode_plain("")  # build the literal tokenizer now, not in the first request
        if self.status != "stopping":  # a SIGTERM during loading stays a stop
            self.status = "ready"

    def load(self, loader: Callable[[], object]) -> None:
        try:
            self.ready(loader())
        except UserError as e:
            self._failed(str(e))
        except MemoryError:
            self._failed("out of memory while loading the model")
        except Exception as e:  # a bug in loading: keep the traceback
            log.exception("loading the model failed")
            self._failed(one_line(e))

    def _failed(self, message: str) -> None:
        self.status, self.error = "failed", message
        log.error("error: %s", message)
        if self.on_load_failure is not None:
            self.on_load_failure(message)

    def require_ready(self):
        if self.status == "ready":
            return self.vl2, self.scheduler
        if self.status == "loading":
            raise unavailable("the model is still loading; GET /health says when it is ready",
                              self.config.retry_after_s)
        if self.status == "stopping":
            raise unavailable("the server is shutting down", self.config.retry_after_s)
        raise ApiError(500, f"the model failed to load: {self.error}", code="model_load_failed")

    def stop_accepting(self) -> None:
        """SIGTERM / Ctrl-C: new requests get 503 from now on; queued and running ones continue."""
        if self.status in ("ready", "loading"):
            self.status = "stopping"

    def health(self) -> dict:
        info = dict(self.vl2.info) if self.vl2 is not None else {}
        cache = self.vl2.vision_cache if self.vl2 is not None else None
        return {"status": self.status, "model": self.model_id, "error": self.error,
                "bundle": info.pop("bundle", None), "checkpoint": info.pop("checkpoint", None),
                "device_profile": info.pop("device_profile", None), "backend": info.pop("backend", None),
                "providers": info.pop("providers", None), **info,
                "queue": self.scheduler.state() if self.scheduler else None,
                "vision_cache": cache.stats().as_dict() if cache else None}

    def log_done(self, job, outcome) -> None:
        t = outcome.timings
        log.info("200 chat: prompt %d tokens (%d images, %d/%d tiles cached), %d new, %s, ttft %.2f s, total %.2f s",
                 outcome.prompt_tokens, len(job.request.images), t.get("vision_tiles_cached", 0),
                 t.get("vision_tiles", 0), outcome.completion_tokens, outcome.finish_reason, t.get("ttft_s", 0),
                 t.get("total_s", 0))


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but /health (compared in constant time)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = Headers(scope=scope).get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                e = ApiError(401, "missing or wrong API key; send the header Authorization: Bearer <key>",
                             code="invalid_api_key")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(vl2=None, config: ServeConfig = ServeConfig(), loader: Callable[[], object] | None = None,
               model_id: str | None = None, on_load_failure: Callable[[str], None] | None = None) -> Starlette:
    """The ASGI app over `vl2` (ready at once) or over `loader()` (run in a thread at startup). `model_id` (else
    config.model_id, else the model folder's name) is the name clients must send."""
    if (vl2 is None) == (loader is None):
        raise ValueError("give a pipeline or a loader")
    name = model_id or config.model_id or (Path(vl2.model_dir).name if vl2 is not None else "edge-vl2")
    state = ServeState(config, name, on_load_failure)
    if vl2 is not None:
        state.ready(vl2)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if loader is not None:
            state.loading = threading.Thread(target=state.load, args=(loader,), name="edge-vl2-load", daemon=True)
            state.loading.start()
        yield
        state.stop_accepting()
        if state.loading is not None:  # stopped while loading: let it end (torch must not die under it)
            await anyio.to_thread.run_sync(state.loading.join, config.grace_s)
        if state.scheduler is not None:
            await anyio.to_thread.run_sync(state.scheduler.close, 5.0)

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", lambda r: JSONResponse(models(state.model_id, state.created)), methods=["GET"]),
              Route("/v1/models/{name:path}", _model_route, methods=["GET"]),
              Route("/health", lambda r: JSONResponse(state.health(), status_code=200 if state.status != "failed"
                                                      else 503), methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.serve = state
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, key=config.api_key)
    return app


async def _model_route(request: Request):
    state = request.app.state.serve
    name = request.path_params["name"]
    if name != state.model_id:
        return error_response(ApiError(404, f"model {name!r} is not served here; this server runs "
                                            f"{state.model_id!r}", code="model_not_found"))
    return JSONResponse(model(state.model_id, state.created))


async def _http_error(request: Request, exc: HTTPException):
    """Starlette's own 404 / 405 in OpenAI's shape."""
    what = {404: f"no route {request.url.path}; this server has POST /v1/chat/completions, GET /v1/models, "
                 "GET /health", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(ApiError(exc.status_code, what.get(exc.status_code, exc.detail)))
