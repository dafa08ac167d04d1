"""`dspark serve`: the OpenAI-compatible server (dspark/serve) under uvicorn."""

from __future__ import annotations

import argparse

from dspark.cli.generate import add_target_arguments, cuda_graphs_of, make_drafter
from dspark.models import load_model, load_tokenizer
from dspark.models.dtypes import resolve_weights


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--drafter", default="auto", help="as for `dspark generate` (auto, none, ngram, dspark:DIR, ...)")
    ap.add_argument("--num-draft", type=int, default=None)
    ap.add_argument("--served-model-name", default=None, help="the `model` clients send (default: from --model)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=16, help="requests decoded together (cache rows)")
    ap.add_argument("--max-model-len", type=int, default=2048, help="prompt + completion tokens per request")
    ap.add_argument("--max-prefill-tokens", type=int, default=512,
                    help="prompt tokens prefilled per engine step (longer prompts in chunks; running requests "
                         "decode between them)")
    ap.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond the batch; more get 429")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (0: none)")
    add_target_arguments(ap)


def build(args):
    """(app, loop): the engine loop started, the FastAPI app over it."""
    from dspark.engine import Engine
    from dspark.profiling import load_or_measure_sps
    from dspark.scheduler import PrefixScheduler
    from dspark.serve import EngineLoop, Limits, create_app

    graphs = cuda_graphs_of(args)
    dtype, native = resolve_weights(args.weights, args.dtype, args.model, args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype, args.device, native=native)
    model.batch_invariant_prefill = args.batch_invariant_prefill
    drafter = make_drafter(args.drafter, model, args.num_draft, dtype, args.device, args.model)
    num_draft = drafter.num_draft if drafter is not None else 0
    policy = None
    if drafter is not None and drafter.gives_confidences:
        policy = PrefixScheduler(load_or_measure_sps(model, args.max_batch * (1 + num_draft)),
                                 throughput_gate=not args.no_throughput_gate)
    engine = Engine(model, tokenizer, drafter, policy=policy, max_batch=args.max_batch,
                    max_seq_len=args.max_model_len + num_draft + 8, max_prefill_tokens=args.max_prefill_tokens,
                    cuda_graphs=graphs)
    name = args.served_model_name or (args.model or "SmolLM2-135M-Instruct")
    limits = Limits(name, model.config.vocab_size, args.max_model_len)
    loop = EngineLoop(engine, max_waiting=args.max_waiting)
    loop.start()
    return create_app(loop, tokenizer, limits, args.request_timeout or None), loop


def run(args) -> int:
    import uvicorn

    app, loop = build(args)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        loop.stop()
    return 0
