"""`dspark serve` over loopback with the official openai client and raw HTTP: completions and chat, stream
and not, 16 concurrent greedy requests equal to offline decoding, a client that disconnects mid-stream,
every bad-input case, the queue limit, /metrics parsed by prometheus-client. A tiny random Llama with
SmolLM2's vocabulary and tokenizer serves most tests; one test serves SmolLM2 itself."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from builders import write_tiny_llama  # noqa: E402
from dspark.drafters import NgramDrafter  # noqa: E402
from dspark.engine import Engine  # noqa: E402
from dspark.models import load_model, load_tokenizer  # noqa: E402
from dspark.sampling_params import SamplingParams  # noqa: E402
from dspark.serve import EngineLoop, Limits, create_app  # noqa: E402

MODEL = "tiny"
MAX_MODEL_LEN = 160


class Server:
    """A uvicorn server on 127.0.0.1 (a free port) in a thread, over a fresh engine loop."""

    def __init__(self, model, tokenizer, drafter=None, max_batch=8, max_waiting=64, timeout=None, name=MODEL,
                 round_delay=0.0):
        self.engine = Engine(model, tokenizer, drafter, max_batch=max_batch, max_seq_len=MAX_MODEL_LEN + 16)
        # round_delay: a slower engine, so that a client can go away while its request is still running
        self.loop = EngineLoop(self.engine, max_waiting=max_waiting,
                               on_round=(lambda loop: time.sleep(round_delay)) if round_delay else None)
        self.loop.start()
        app = create_app(self.loop, tokenizer, Limits(name, model.config.vocab_size, MAX_MODEL_LEN), timeout)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.loop.stop()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny_served")
    write_tiny_llama(path, len(tokenizer), hidden=32, layers=2, heads=2, kv_heads=1, max_positions=256, sharpen=8.0)
    return load_model(str(path), torch.float32)


@pytest.fixture(scope="module")
def server(tiny, tokenizer):
    s = Server(tiny, tokenizer, NgramDrafter(3))
    yield s
    s.close()


def offline(model, tokenizer, prompts, params) -> list[list[int]]:
    return [Engine(model, tokenizer, None, max_batch=1, max_seq_len=MAX_MODEL_LEN + 16).generate([p], params)[0]
            .generated for p in prompts]


PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]


def test_completion_and_chat_with_the_openai_client(server, tiny, tokenizer):
    out = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    [expected] = offline(tiny, tokenizer, [tokenizer(PROMPTS[0]).input_ids], SamplingParams(max_tokens=12))
    assert out.choices[0].text == tokenizer.decode(expected)
    assert out.usage.prompt_tokens == len(tokenizer(PROMPTS[0]).input_ids)
    assert out.usage.completion_tokens == len(expected)
    stats = out.model_extra["dspark"]
    assert stats["rounds"] >= 1 and stats["tau"] >= 1.0 and stats["accepted_draft_tokens"] >= 0
    chat = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}],
                                                 max_tokens=8, temperature=0)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                        tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    [expected] = offline(tiny, tokenizer, [ids], SamplingParams(max_tokens=8))
    assert chat.choices[0].message.content == tokenizer.decode(expected)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens == len(ids)
    assert [m.id for m in server.client.models.list().data] == [MODEL]


def test_streams_equal_the_whole_reply(server):
    whole = server.client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0)
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    chat = list(server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count"}],
                                                      max_tokens=10, temperature=0, stream=True))
    reply = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count"}],
                                                  max_tokens=10, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chat) == reply.choices[0].message.content


def test_sixteen_concurrent_greedy_requests_equal_offline_decoding(server, tiny, tokenizer):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda p: server.client.completions.create(
            model=MODEL, prompt=p, max_tokens=16, temperature=0), prompts))
    expected = offline(tiny, tokenizer, [tokenizer(p).input_ids for p in prompts], SamplingParams(max_tokens=16))
    assert [r.choices[0].text for r in replies] == [tokenizer.decode(e) for e in expected]


def test_a_client_that_disconnects_frees_its_rows(tiny, tokenizer):
    s = Server(tiny, tokenizer, None, max_batch=2, round_delay=0.02)
    try:
        body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 120, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", s.url + "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
        # the other requests still run to completion, and the aborted one leaves the batch
        other = s.client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=8, temperature=0)
        assert other.choices[0].finish_reason in ("length", "stop")
        deadline = time.time() + 20
        while (s.engine.running or s.engine.waiting) and time.time() < deadline:
            time.sleep(0.05)
        assert not s.engine.running and sorted(s.engine.free_rows) == [0, 1] and not s.engine.finished
        assert s.loop.ended["abort"] == 1  # it was aborted, not run to its end
    finally:
        s.close()


BAD = [
    ("malformed json", b"{not json", None),
    ("not an object", json.dumps([1, 2]).encode(), None),
    ("no model", {"prompt": "x"}, "model"),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, "model"),
    ("empty prompt", {"model": MODEL, "prompt": ""}, "prompt"),
    ("empty token list", {"model": MODEL, "prompt": []}, "prompt"),
    ("prompt wrong type", {"model": MODEL, "prompt": 42}, "prompt"),
    ("token id outside vocabulary", {"model": MODEL, "prompt": [1, 2, 10**9]}, "prompt"),
    ("negative token id", {"model": MODEL, "prompt": [1, -3]}, "prompt"),
    ("over-long prompt", {"model": MODEL, "prompt": [5] * MAX_MODEL_LEN}, "prompt"),
    ("max_tokens zero", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("max_tokens past the context", {"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("max_tokens a string", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("temperature negative", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ("temperature a string", {"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ("top_p zero", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ("top_p above one", {"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
    ("top_k negative", {"model": MODEL, "prompt": "x", "top_k": -5}, "top_k"),
    ("seed float", {"model": MODEL, "prompt": "x", "seed": 1.5}, "seed"),
    ("stop wrong type", {"model": MODEL, "prompt": "x", "stop": 7}, "stop"),
    ("n above one", {"model": MODEL, "prompt": "x", "n": 2}, "n"),
    ("stream not a bool", {"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
]
BAD_CHAT = [
    ("no messages", {"model": MODEL}, "messages"),
    ("empty messages", {"model": MODEL, "messages": []}, "messages"),
    ("bad role", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("content not a string", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages"),
]


@pytest.mark.parametrize("name, body, param", BAD + [("chat " + n, b, p) for n, b, p in BAD_CHAT],
                         ids=[c[0] for c in BAD] + ["chat " + c[0] for c in BAD_CHAT])
def test_bad_input_gets_an_error_naming_the_field(server, name, body, param):
    endpoint = "/v1/chat/completions" if name.startswith("chat") else "/v1/completions"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    before = len(server.engine.finished) + server.engine.next_id
    response = httpx.post(server.url + endpoint, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert server.engine.next_id + len(server.engine.finished) == before  # nothing reached the engine


def test_queue_limit_and_deadline(tiny, tokenizer):
    s = Server(tiny, tokenizer, None, max_batch=1, max_waiting=1, timeout=60, round_delay=0.005)
    try:
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code,
                                  range(6)))
        assert 429 in codes and 200 in codes, codes
    finally:
        s.close()
    s = Server(tiny, tokenizer, None, max_batch=1, timeout=0.05, round_delay=0.005)
    try:
        response = httpx.post(s.url + "/v1/completions", json={**body, "max_tokens": 150}, timeout=60)
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
        assert not s.engine.running and not s.engine.finished and s.loop.ended["timeout"] == 1
    finally:
        s.close()


def test_metrics_parse_and_count(server):
    from prometheus_client.parser import text_string_to_metric_families

    server.client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=6, temperature=0)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("dspark_requests", "dspark_prompt_tokens", "dspark_generated_tokens", "dspark_queue_depth",
                 "dspark_running_requests", "dspark_tau", "dspark_acceptance", "dspark_verification_budget",
                 "dspark_engine_seconds", "dspark_request_seconds"):
        assert name in families, name
    ok = [s.value for s in families["dspark_requests"].samples if s.labels.get("status") == "200"]
    assert sum(ok) >= 1 and families["dspark_tau"].samples[0].value >= 1.0
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}


def test_serves_smollm2(tokenizer):
    model = load_model(None, torch.bfloat16)
    s = Server(model, tokenizer, NgramDrafter(3), name="SmolLM2-135M-Instruct")
    try:
        reply = s.client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=16, temperature=0,
                                                 messages=[{"role": "user", "content": "What is 2 + 2?"}])
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        [expected] = offline(model, tokenizer, [ids], SamplingParams(max_tokens=16))
        assert reply.choices[0].message.content == tokenizer.decode(expected)
    finally:
        s.close()


def test_stop_strings_end_the_reply_and_never_stream(server):
    whole = server.client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0)
    text = whole.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    cut = server.client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = server.client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                                stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_an_engine_error_fails_its_requests_and_the_server_goes_on(tiny, tokenizer, monkeypatch):
    s = Server(tiny, tokenizer, None, max_batch=2)
    try:
        forward = type(tiny).forward
        calls = {"n": 0}

        def failing(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected failure")
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(type(tiny), "forward", failing)
        response = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4},
                              timeout=60)
        assert response.status_code == 500 and "injected failure" in response.json()["error"]["message"]
        assert sorted(s.engine.free_rows) == [0, 1] and not s.engine.waiting and not s.engine.running
        ok = s.client.completions.create(model=MODEL, prompt="y", max_tokens=4, temperature=0)
        assert ok.choices[0].finish_reason in ("length", "stop")
        assert httpx.get(s.url + "/health", timeout=30).status_code == 200
    finally:
        s.close()


def test_a_non_streaming_client_that_leaves_aborts_its_request(tiny, tokenizer):
    s = Server(tiny, tokenizer, None, max_batch=1, round_delay=0.05)
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 120}, timeout=0.5)
        deadline = time.time() + 20
        while s.loop.ended["abort"] == 0 and time.time() < deadline:
            time.sleep(0.1)
        assert s.loop.ended["abort"] == 1 and not s.engine.running and s.engine.free_rows == [0]
    finally:
        s.close()


def test_serve_command_builds_its_engine_from_the_flags(tmp_path, tokenizer):
    from dspark.cli import parser, serve

    path = tmp_path / "m"
    write_tiny_llama(path, len(tokenizer), hidden=32, layers=2, heads=2, kv_heads=1, max_positions=256)
    tokenizer.save_pretrained(str(path))
    args = parser().parse_args(["serve", "--model", str(path), "--drafter", "none", "--weights", "fp32",
                                "--max-batch", "3", "--max-model-len", "64", "--max-prefill-tokens", "7"])
    app, loop = serve.build(args)
    try:
        engine = loop.engine
        assert engine.max_prefill_tokens == 7 and engine.cache.rows == 3 and engine.drafter is None
        assert engine.model.dtype == torch.float32 and engine.max_seq_len >= 64
    finally:
        loop.stop()
