"""`dspark serve`: an OpenAI-compatible HTTP server with speculative decoding and continuous batching.

`create_app(EngineLoop(engine), tokenizer, Limits(...))` builds the FastAPI app; `dspark.cli.serve`
runs it under uvicorn. Needs the `serve` extra (fastapi, uvicorn, prometheus-client)."""

from dspark.serve.app import create_app
from dspark.serve.loop import EngineLoop, QueueFull
from dspark.serve.protocol import Limits, RequestError

__all__ = ["create_app", "EngineLoop", "QueueFull", "Limits", "RequestError"]
