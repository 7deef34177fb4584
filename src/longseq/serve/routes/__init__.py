"""The server's routes: the OpenAI API's completions, chat completions and models, plus /health and /metrics, and
vLLM's LoRA adapter loading and unloading."""

from fastapi import APIRouter

from longseq.serve.routes import chat, completions, info, lora

router = APIRouter()
for module in (info, completions, chat, lora):
    router.include_router(module.router)

__all__ = ["router"]
