"""`longseq serve`: an OpenAI-compatible HTTP server over the async engine."""

from longseq.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
