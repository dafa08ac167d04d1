"""How the API answers a generation request (/v1/completions, /v1/chat/completions): parse, submit to the
EngineLoop, then one JSON body or a stream of server-sent events, with the request's usage and DSpark's own
statistics; a client that leaves frees its request's rows."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from dspark.engine import Event
from dspark.serve.loop import EngineLoop, Final, Handle, QueueFull
from dspark.serve.metrics import ServerMetrics
from dspark.serve.protocol import Limits, Parsed, RequestError, parse_json

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


def usage(handle: Handle) -> dict:
    r = handle.result
    return {"prompt_tokens": len(handle.prompt_ids), "completion_tokens": len(r.generated),
            "total_tokens": len(handle.prompt_ids) + len(r.generated)}


def dspark_stats(handle: Handle) -> dict:
    s = handle.result.stats
    return {"rounds": s.rounds, "tau": s.emitted / s.rounds if s.rounds else 0.0,
            "accepted_draft_tokens": s.emitted - s.rounds, "verified_draft_tokens": s.verified}


def event_chunk(meta: dict, chat: bool, delta: str | None, reason: str | None, first: bool = False) -> str:
    """One server-sent event of a stream: a chat delta (the first one names the role) or a completion's text."""
    if chat:
        body = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta is not None else {})
        choice = {"index": 0, "delta": body, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
    kind = "chat.completion.chunk" if chat else "text_completion"
    return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"


class Responder:
    """The generation endpoints' handling, over one EngineLoop and tokenizer; counts every answer in `metrics`."""

    def __init__(self, loop: EngineLoop, tokenizer, limits: Limits, metrics: ServerMetrics,
                 request_timeout_s: float | None = None):
        self.loop, self.tokenizer, self.limits, self.metrics = loop, tokenizer, limits, metrics
        self.request_timeout_s = request_timeout_s

    def error(self, e: RequestError, endpoint: str) -> JSONResponse:
        self.metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    async def serve(self, http: Request, endpoint: str, parse, chat: bool):
        try:
            parsed: Parsed = parse(parse_json(await http.body()), self.tokenizer, self.limits)
            handle = self.loop.submit(parsed.prompt_ids, parsed.params, self.request_timeout_s)
        except RequestError as e:
            return self.error(e, endpoint)
        except QueueFull as e:
            return self.error(RequestError(str(e), None, 429, "rate_limit_error"), endpoint)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.limits.model_name}
        # After the response, whatever ended it (a finished request: a no-op; a client that left before
        # the stream started: frees the request's row).
        cleanup = BackgroundTask(self.loop.abort, handle)
        if parsed.stream:
            return StreamingResponse(self.stream(handle, parsed, meta, endpoint, chat), media_type="text/event-stream",
                                     background=cleanup)
        response = await self.complete(http, handle, meta, endpoint, chat)
        response.background = cleanup
        return response

    async def drain(self, http: Request, handle: Handle) -> Final:
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
                        self.loop.abort(handle)
                        watch = asyncio.ensure_future(asyncio.Event().wait())  # the Final comes next
                    else:
                        watch = asyncio.ensure_future(http.receive())
                    continue
                item = get.result()
                if isinstance(item, Final):
                    return item
        finally:
            watch.cancel()

    def failed(self, final: Final, endpoint: str) -> JSONResponse:
        status = {"timeout": 504, "abort": 499}.get(final.reason, 500)
        kind = "timeout" if final.reason == "timeout" else "server_error"
        return self.error(RequestError(final.message or f"request ended: {final.reason}", None, status, kind), endpoint)

    async def complete(self, http: Request, handle: Handle, meta: dict, endpoint: str, chat: bool) -> JSONResponse:
        try:
            final = await self.drain(http, handle)
        except BaseException:  # the client went away (the handler is cancelled): free its rows
            self.loop.abort(handle)
            raise
        if final.reason not in FINISH:
            return self.failed(final, endpoint)
        r = handle.result
        self.metrics.finished(r, time.perf_counter() - handle.started)
        self.metrics.requests.labels(endpoint, "200").inc()
        reason = FINISH[final.reason]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": reason,
                      "logprobs": None}
            body = {**meta, "object": "chat.completion", "choices": [choice]}
        else:
            body = {**meta, "object": "text_completion",
                    "choices": [{"index": 0, "text": r.text, "finish_reason": reason, "logprobs": None}]}
        return JSONResponse({**body, "usage": usage(handle), "dspark": dspark_stats(handle)})

    async def stream(self, handle: Handle, parsed: Parsed, meta: dict, endpoint: str, chat: bool):
        holdback = max((len(stop) for stop in parsed.params.stop_strings), default=1) - 1
        try:
            if chat:
                yield event_chunk(meta, chat, "", None, first=True)
            text = TextStream(self.tokenizer, holdback)
            while True:
                item = await handle.events.get()
                if isinstance(item, Final):
                    break
                # A request's last event may carry the token that completed a stop string: its text goes
                # out with the final chunk, cut where the engine cut it.
                piece = text.push(item.new_tokens) if isinstance(item, Event) and not item.finished else ""
                if piece:
                    yield event_chunk(meta, chat, piece, None)
            if item.reason not in FINISH:
                self.metrics.requests.labels(endpoint, "500" if item.reason == "error" else item.reason).inc()
                err = {"error": {"message": item.message or f"request ended: {item.reason}", "type": "server_error",
                                 "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            r = handle.result
            rest = r.text[len(os.path.commonprefix([text.sent, r.text])):]
            yield event_chunk(meta, chat, rest if rest else (None if chat else ""), FINISH[item.reason])
            if parsed.include_usage:
                kind = "chat.completion.chunk" if chat else "text_completion"
                tail = {**meta, "object": kind, "choices": [], "usage": usage(handle), "dspark": dspark_stats(handle)}
                yield f"data: {json.dumps(tail)}\n\n"
            self.metrics.finished(r, time.perf_counter() - handle.started)
            self.metrics.requests.labels(endpoint, "200").inc()
            yield "data: [DONE]\n\n"
        except BaseException:  # cancelled (client disconnected) or failed: the engine frees its rows
            self.loop.abort(handle)
            raise
