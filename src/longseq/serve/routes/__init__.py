"""The server's routes: the OpenAI API's completions, chat completions and models, plus /health and /metrics."""

from fastapi import APIRouter

from longseq.serve.routes import chat, completions, info

router = APIRouter()
for module in (info, completions, chat):
    router.include_router(module.router)

__all__ = ["router"]
