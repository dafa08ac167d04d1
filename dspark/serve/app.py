"""The OpenAI-compatible HTTP API over an EngineLoop: /v1/completions, /v1/chat/completions (streamed
as server-sent events or not), /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
import weakref

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dspark.engine import Event
from dspark.serve.loop import EngineLoop, Final, Handle, QueueFull
from dspark.serve.metrics import ServerMetrics
from dspark.serve.protocol import Limits, Parsed, RequestError, parse_chat, parse_completion, parse_json

FINISH = {"stop": "stop", "length": "length"}


class TextStream:
    """Incremental detokenisation: the text of all tokens so far, released up to the last complete
    character (a token may end inside a multi-byte UTF-8 sequence) and minus `holdback` characters, so
    that no part of a stop string is sent before the engine has seen whether it completes."""

    def __init__(self, tokenizer, holdback: int = 0):
        self.tokenizer, self.holdback, self.tokens, self.sent = tokenizer, holdback, [], ""

    def push(self, tokens: list[int]) -> str:
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        # Trailing whitespace waits too: a tokenizer's clean-up may drop it once the next token arrives.
        text = text[: len(text) - self.holdback].rstrip()
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


def create_app(loop: EngineLoop, tokenizer, limits: Limits, request_timeout_s: float | None = None) -> FastAPI:
    app = FastAPI(title="dspark", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(weakref.ref(loop))
    app.state.loop, app.state.metrics = loop, metrics

    def error(e: RequestError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

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

    async def serve(http: Request, endpoint: str, parse, chat: bool):
        try:
            parsed: Parsed = parse(parse_json(await http.body()), tokenizer, limits)
            handle = loop.submit(parsed.prompt_ids, parsed.params, request_timeout_s)
        except RequestError as e:
            return error(e, endpoint)
        except QueueFull as e:
            return error(RequestError(str(e), None, 429, "rate_limit_error"), endpoint)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": limits.model_name}
        # After the response, whatever ended it (a finished request: a no-op; a client that left before
        # the stream started: frees the request's row).
        cleanup = BackgroundTask(loop.abort, handle)
        if parsed.stream:
            return StreamingResponse(stream(http, handle, parsed, meta, endpoint, chat), media_type="text/event-stream",
                                     background=cleanup)
        response = await complete(http, handle, parsed, meta, endpoint, chat)
        response.background = cleanup
        return response

    async def drain(http: Request, handle: Handle) -> Final:
        """Waits for the request's end. Starlette does not cancel a plain handler when its client goes
        away, so the handler also listens for the connection's disconnect message and aborts on it."""
        watch = asyncio.ensure_future(http.receive())
        try:
            while True:
                get = asyncio.ensure_future(handle.events.get())
                done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()  # a cancelled Queue.get loses no item
                    if watch.result().get("type") == "http.disconnect":
                        loop.abort(handle)
                        watch = asyncio.ensure_future(asyncio.Event().wait())  # the Final comes next
                    else:
                        watch = asyncio.ensure_future(http.receive())
                    continue
                item = get.result()
                if isinstance(item, Final):
                    return item
        finally:
            watch.cancel()

    def usage(handle: Handle) -> dict:
        r = handle.result
        return {"prompt_tokens": len(handle.prompt_ids), "completion_tokens": len(r.generated),
                "total_tokens": len(handle.prompt_ids) + len(r.generated)}

    def dspark_stats(handle: Handle) -> dict:
        s = handle.result.stats
        return {"rounds": s.rounds, "tau": s.emitted / s.rounds if s.rounds else 0.0,
                "accepted_draft_tokens": s.emitted - s.rounds, "verified_draft_tokens": s.verified}

    def failed(final: Final, endpoint: str) -> JSONResponse:
        status = {"timeout": 504, "abort": 499}.get(final.reason, 500)
        kind = "timeout" if final.reason == "timeout" else "server_error"
        return error(RequestError(final.message or f"request ended: {final.reason}", None, status, kind), endpoint)

    async def complete(http, handle, parsed, meta, endpoint, chat):
        try:
            final = await drain(http, handle)
        except BaseException:  # the client went away (the handler is cancelled): free its rows
            loop.abort(handle)
            raise
        if final.reason not in FINISH:
            return failed(final, endpoint)
        r = handle.result
        metrics.finished(r, time.perf_counter() - handle.started)
        metrics.requests.labels(endpoint, "200").inc()
        reason = FINISH[final.reason]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": reason,
                      "logprobs": None}
            body = {**meta, "object": "chat.completion", "choices": [choice]}
        else:
            body = {**meta, "object": "text_completion",
                    "choices": [{"index": 0, "text": r.text, "finish_reason": reason, "logprobs": None}]}
        return JSONResponse({**body, "usage": usage(handle), "dspark": dspark_stats(handle)})

    async def stream(http, handle, parsed, meta, endpoint, chat):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                body = {"role": "assistant", "content": delta or ""} if first else (
                    {"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": body, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

        holdback = max((len(stop) for stop in parsed.params.stop_strings), default=1) - 1
        try:
            if chat:
                yield chunk("", None, first=True)
            text = TextStream(tokenizer, holdback)
            while True:
                item = await handle.events.get()
                if isinstance(item, Final):
                    break
                # A request's last event may carry the token that completed a stop string: its text goes
                # out with the final chunk, cut where the engine cut it.
                piece = text.push(item.new_tokens) if isinstance(item, Event) and not item.finished else ""
                if piece:
                    yield chunk(piece, None)
            if item.reason not in FINISH:
                metrics.requests.labels(endpoint, "500" if item.reason == "error" else item.reason).inc()
                err = {"error": {"message": item.message or f"request ended: {item.reason}", "type": "server_error",
                                 "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            r = handle.result
            rest = r.text[len(os.path.commonprefix([text.sent, r.text])):]
            yield chunk(rest if rest else (None if chat else ""), FINISH[item.reason])
            if parsed.include_usage:
                yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': usage(handle), 'dspark': dspark_stats(handle)})}\n\n"
            metrics.finished(r, time.perf_counter() - handle.started)
            metrics.requests.labels(endpoint, "200").inc()
            yield "data: [DONE]\n\n"
        except BaseException:  # cancelled (client disconnected) or failed: the engine frees its rows
            loop.abort(handle)
            raise

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await serve(http, "completions", parse_completion, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await serve(http, "chat", parse_chat, chat=True)

    return app
