"""GET /health, /metrics (Prometheus) and /v1/models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from longseq.serve import protocol as p
from longseq.serve.errors import guarded
from longseq.serve.metrics import CONTENT_TYPE
from longseq.serve.state import Server, check_key

router = APIRouter()


@router.get("/health")
@guarded
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
@guarded
async def prometheus(server: Server) -> Response:
    return Response(server.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", dependencies=[Depends(check_key)])
@guarded
async def list_models(server: Server) -> dict[str, Any]:
    return {"object": "list", "data": server.model_cards()}


@router.get("/v1/models/{model:path}", dependencies=[Depends(check_key)])
@guarded
async def get_model(model: str, server: Server) -> dict[str, Any]:
    card = next((c for c in server.model_cards() if c["id"] == model), None)
    if card is None and model in server.accepted_models:
        card = server.model_card()
    if card is None:
        raise p.ApiError(f"the model '{model}' does not exist", 404, param="model", code="model_not_found")
    return card
