"""`longseq serve`'s HTTP layer: an OpenAI-compatible API over an AsyncLLMEngine, plus /health and /metrics."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from longseq.engine.async_engine import QueueFullError
from longseq.serve.body import DEFAULT_MAX_REQUEST_BYTES
from longseq.serve.engine import ServingEngine
from longseq.serve.errors import api_error_response, as_api_error, error_response
from longseq.serve.metrics import ServerMetrics
from longseq.serve.protocol import ApiError
from longseq.serve.routes import router
from longseq.serve.state import ServerState, check_key


def create_app(engine: ServingEngine, api_key: str | None = None, served_model_name: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app over engine (an AsyncLLMEngine). api_key: required as a Bearer token on /v1/* and
    /openapi.json when set (/health and /metrics stay open, for load balancers and scrapers). max_request_bytes:
    larger bodies are refused with 413."""
    metrics = ServerMetrics(engine.stats)
    # No /docs or /redoc: their pages load scripts from a CDN, and could not send the key for the schema anyway.
    app = FastAPI(title="longseq", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.server = ServerState(engine, served_model_name or engine.model_name, metrics, api_key,
                                   max_request_bytes)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(check_key)])
    async def _openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.exception_handler(ApiError)
    async def _on_api_error(_: Request, e: ApiError) -> JSONResponse:
        return api_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(400, str(e.errors()), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _on_crash(_: Request, e: Exception) -> JSONResponse:  # a last resort: see errors.guarded
        return api_error_response(as_api_error(e))

    app.include_router(router)
    return app


def serve(
    engine: ServingEngine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
    served_model_name: str | None = None, log_level: str = "info",
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> None:
    """Runs the server until interrupted (blocking)."""
    import uvicorn

    app = create_app(engine, api_key=api_key, served_model_name=served_model_name,
                     max_request_bytes=max_request_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)


__all__ = ["QueueFullError", "create_app", "serve"]
