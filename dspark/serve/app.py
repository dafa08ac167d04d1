"""The OpenAI-compatible HTTP API over an EngineLoop: /v1/completions, /v1/chat/completions (streamed
as server-sent events or not: dspark.serve.responses), /v1/models, /health, /metrics."""

from __future__ import annotations

import weakref

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dspark.serve.loop import EngineLoop
from dspark.serve.metrics import ServerMetrics
from dspark.serve.protocol import Limits, parse_chat, parse_completion
from dspark.serve.responses import Responder


def create_app(loop: EngineLoop, tokenizer, limits: Limits, request_timeout_s: float | None = None) -> FastAPI:
    app = FastAPI(title="dspark", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(weakref.ref(loop))
    app.state.loop, app.state.metrics = loop, metrics
    responder = Responder(loop, tokenizer, limits, metrics, request_timeout_s)

    @app.get("/health")
    async def health():
        if not loop.alive():
            return JSONResponse({"status": "engine thread stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": limits.model_name, "object": "model", "created": 0,
                                            "owned_by": "dspark", "max_model_len": limits.max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await responder.serve(http, "completions", parse_completion, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await responder.serve(http, "chat", parse_chat, chat=True)

    return app
