"""OpenAI-style request validation: every bad field gets an error object naming it, before anything
reaches the engine."""

from __future__ import annotations

import dataclasses
import json
import math

from dspark.sampling_params import SamplingParams


class RequestError(Exception):
    """A client error: HTTP `status`, OpenAI's error object with `param` naming the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclasses.dataclass
class Limits:
    model_name: str
    vocab_size: int
    max_model_len: int  # prompt + max_tokens
    default_max_tokens: int = 256


@dataclasses.dataclass
class Parsed:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def _int(body: dict, name: str, default, low: int | None = None, high: int | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {json.dumps(value)}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"{name} must lie in [{low}, {high}], got {value}", name)
    return value


def _float(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {json.dumps(value)}", name)
    if value > high or value < low or (low_open and value == low):
        raise RequestError(f"{name} must lie in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop must be a non-empty string or a list of at most 4 of them", "stop")
    return tuple(stop)


def _check_common(body: dict, limits: Limits) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("model is required (a string)", "model")
    if model != limits.model_name:
        raise RequestError(f"model {model!r} is not served here; this server has {limits.model_name!r}", "model")
    n = _int(body, "n", 1)
    if n != 1:
        raise RequestError("only n = 1 is supported", "n")
    for name in ("stream",):
        if name in body and not isinstance(body[name], bool):
            raise RequestError(f"{name} must be true or false", name)


def sampling(body: dict, prompt_len: int, limits: Limits) -> tuple[SamplingParams, bool, bool]:
    room = limits.max_model_len - prompt_len
    if room < 1:
        raise RequestError(f"the prompt has {prompt_len} tokens; this server takes at most "
                           f"{limits.max_model_len - 1} (max_model_len {limits.max_model_len})", "prompt")
    default = min(limits.default_max_tokens, room)
    max_tokens = _int(body, "max_completion_tokens", None, 1, room) or _int(body, "max_tokens", default, 1, room)
    temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _float(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _int(body, "top_k", 0, -1, limits.vocab_size)
    seed = _int(body, "seed", 0, 0, 2**63 - 1)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise RequestError("stream_options must be an object with a boolean include_usage", "stream_options")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                            seed=seed, stop_strings=_stop(body))
    return params, bool(body.get("stream", False)), bool((options or {}).get("include_usage", False))


def _token_ids(values, limits: Limits) -> list[int]:
    if not values:
        raise RequestError("prompt is empty", "prompt")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
        raise RequestError("a token-id prompt must hold integers only", "prompt")
    bad = [t for t in values if not 0 <= t < limits.vocab_size]
    if bad:
        raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})", "prompt")
    return list(values)


def parse_completion(body: dict, tokenizer, limits: Limits) -> Parsed:
    _check_common(body, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt is empty", "prompt")
        ids = tokenizer(prompt).input_ids
    elif isinstance(prompt, list):
        ids = _token_ids(prompt, limits)
    else:
        raise RequestError("prompt must be a string or a list of token ids (one prompt)", "prompt")
    params, stream, usage = sampling(body, len(ids), limits)
    return Parsed(ids, params, stream, usage)


def parse_chat(body: dict, tokenizer, limits: Limits) -> Parsed:
    _check_common(body, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] needs a role of system, user or assistant", "messages")
        if not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}].content must be a string", "messages")
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    params, stream, usage = sampling(body, len(ids), limits)
    return Parsed(ids, params, stream, usage)
