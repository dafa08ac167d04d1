"""rejection_sample cases: a random valid round (greedy, sampled, filtered, trees, masked logits,
every source of randomness), and the ways to break one."""

from __future__ import annotations

import random

import torch

from opfuzz.common import FLOATS, I32, I64, Broken, GeneratorSeed, break_parents, depths, draw_round, make_indptr


def rejection_sample_case(rng: random.Random, gen: torch.Generator, backend: str, entry: str) -> tuple[dict, str]:
    num_requests = rng.randint(1, 4)
    # Idle requests (n_r = 0) too, a quarter of the time: the engine passes every cache row.
    counts, _, shape, parent_lists = draw_round(rng, num_requests, rng.choice([1, 3, 6]), rng.choice([0, 1, 1, 1]))
    if not sum(counts):  # at least one request verifies something (the engine never sends an all-idle round)
        counts[0], parent_lists[0] = 1, [-1]
    vocab = rng.choice([1, 2, 3, 5, 16, 33, 100, 257])
    dtype = rng.choice(FLOATS)
    total = sum(counts)
    logits = torch.randn(total, vocab, generator=gen) * rng.choice([0.5, 3.0, 20.0])
    if rng.random() < 0.25:  # ties
        logits = logits.round()
    if rng.random() < 0.3 and vocab > 1:  # masked tokens, never a whole row
        masked = torch.rand(total, vocab, generator=gen) < 0.4
        masked[torch.arange(total), logits.argmax(-1)] = False
        logits[masked] = float("-inf")
    flat_parents = [p for ps in parent_lists for p in ps]
    starts = [0] + [sum(counts[: i + 1]) for i in range(num_requests)]
    tokens = torch.randint(0, vocab, (total,), generator=gen)
    for r, start in enumerate(starts[:-1]):  # half the drafts follow the target's argmax: long accepted paths
        for local in range(1, counts[r]):
            if rng.random() < 0.5:
                tokens[start + local] = int(logits[start + parent_lists[r][local]].argmax())
    temperature = torch.tensor([rng.choice([0.0, 0.0, 0.5, 1.0, 2.0]) for _ in range(num_requests)])
    top_k = torch.tensor([rng.choice([0, 0, 1, 2, vocab, vocab + 3]) for _ in range(num_requests)], dtype=I32)
    top_p = torch.tensor([rng.choice([1.0, 1.0, 0.5, 0.9, 1e-3]) for _ in range(num_requests)])
    probs = None
    if rng.random() < 0.5:
        probs = torch.softmax(torch.randn(total, vocab, generator=gen) * 2, -1)
        probs[torch.rand(total, vocab, generator=gen) < 0.2] = 0.0
        probs = probs.to(rng.choice(FLOATS))
    sampled = bool((temperature > 0).any())
    randomness = rng.choice(["uniforms", "seed"] + (["generator"] if entry == "wrapper" else [])
                            + ([] if sampled else ["none"]))
    args = dict(target_logits=logits.to(dtype), draft_tokens=tokens.to(rng.choice([I32, I64])),
                qo_indptr=make_indptr(counts),
                parents=None if shape == "chain" and rng.random() < 0.5 else torch.tensor(flat_parents, dtype=I32),
                draft_probs=probs, temperature=temperature, top_k=top_k, top_p=top_p,
                uniforms=None, seed=None, offset=None, generator=None, max_nodes=None, draft_vocab=None)
    if probs is not None and rng.random() < 0.3:  # a drafter over a subset of the vocabulary
        size = rng.randint(1, vocab)
        ids = torch.randperm(vocab, generator=gen)[:size].sort().values
        subset = torch.softmax(torch.randn(total, size, generator=gen) * 2, -1)
        subset[torch.rand(total, size, generator=gen) < 0.2] = 0.0
        args["draft_probs"] = subset.to(probs.dtype)
        args["draft_vocab"] = ids.to(rng.choice([I32, I64]))
    if randomness == "uniforms":
        uniforms = torch.rand(total, 2, generator=gen, dtype=torch.float64)
        uniforms[torch.rand(total, 2, generator=gen) < 0.1] = 0.0
        uniforms[torch.rand(total, 2, generator=gen) < 0.05] = 1.0 - 2.0**-53
        args["uniforms"] = uniforms.to(rng.choice([torch.float64, torch.float32])).clamp(max=1.0 - 2.0**-24) \
            if rng.random() < 0.3 else uniforms
    elif randomness == "seed":
        args["seed"] = torch.randint(0, 2**62, (num_requests,), generator=gen)
        args["offset"] = torch.randint(0, 2**40, (num_requests,), generator=gen)
    elif randomness == "generator":
        args["generator"] = GeneratorSeed(rng.randrange(2**31))
    deepest = max(max(depths(ps), default=0) for ps in parent_lists) if shape != "chain" else max(max(counts) - 1, 0)
    args["max_nodes"] = deepest + 1 + rng.randint(0, 2) if entry == "custom_op" or rng.random() < 0.5 else None
    if entry == "wrapper" and rng.random() < 0.3:  # scalars for the per-request parameters
        args["temperature"] = float(temperature[0])
        args["top_k"], args["top_p"] = int(top_k[0]), float(top_p[0])
        if args["seed"] is not None:
            args["seed"], args["offset"] = int(args["seed"][0]), int(args["offset"][0])
        if args["temperature"] > 0 and randomness == "none":
            args["temperature"] = 0.0
    if args["draft_probs"] is not None and rng.random() < 0.3:  # greedy rows are never read: garbage is fine there
        read = set(sampled_rows(args))
        unread = [i for i in range(total) if i not in read]
        if unread:
            garbage = args["draft_probs"].clone()
            garbage[unread] = rng.choice([float("nan"), -1.0, float("inf")])
            args["draft_probs"] = garbage
    label = (f"R={num_requests} n={counts} {shape} V={vocab} {dtype} T={temperature.tolist()} k={top_k.tolist()} "
             f"p={top_p.tolist()} probs={probs is not None} rand={randomness}")
    return args, label


def sampled_rows(args: dict) -> list[int]:
    """The node rows of requests with temperature > 0: the rows of draft_probs the op reads."""
    offsets = args["qo_indptr"].tolist()
    temperature = args["temperature"]
    temps = temperature.tolist() if isinstance(temperature, torch.Tensor) else [temperature] * (len(offsets) - 1)
    return [i for r, (a, b) in enumerate(zip(offsets, offsets[1:])) if temps[r] > 0 for i in range(a, b)]


def break_rejection_sample(rng: random.Random, args: dict, entry: str) -> Broken:
    logits = args["target_logits"]
    total, vocab = logits.shape
    num_requests = args["qo_indptr"].numel() - 1
    choices = ["logits_nan", "logits_posinf", "logits_masked_row", "logits_dtype", "logits_rank", "vocab_zero",
               "tokens_range", "tokens_dtype", "tokens_shape", "indptr_start", "indptr_dtype",
               "probs_negative", "probs_nan", "probs_shape", "probs_dtype", "temperature_negative",
               "temperature_nan", "top_k_negative", "top_p_zero", "top_p_large", "uniforms_range",
               "uniforms_shape", "both_sources", "no_randomness", "max_nodes_zero", "device", "backend"]
    if args["draft_vocab"] is not None:
        choices += ["vocab_order", "vocab_range", "vocab_columns", "vocab_alone"]
    if args["parents"] is not None:
        choices += ["parents_root", "parents_forward", "parents_self", "parents_shape"]
    if args["max_nodes"] is not None:
        choices += ["max_nodes_small"]
    if entry == "custom_op":
        choices += ["temperature_dtype", "top_k_dtype", "seed_dtype", "seed_alone"]
    else:
        choices += ["list_arg"]
    kind = rng.choice(choices)
    if kind.startswith("logits"):
        bad = logits.clone()
        if kind == "logits_dtype":
            args["target_logits"] = logits.to(rng.choice([torch.float64, torch.int64]))
            return Broken(kind, ("target_logits",), False)
        if kind == "logits_rank":
            args["target_logits"] = logits.reshape(-1)
            return Broken(kind, ("target_logits",), False)
        row, col = rng.randrange(total), rng.randrange(vocab)
        if kind == "logits_masked_row":
            bad[row] = float("-inf")
        else:
            bad[row, col] = float("nan") if kind == "logits_nan" else float("inf")
        args["target_logits"] = bad
        return Broken(kind, ("target_logits",), True)
    if kind == "vocab_zero":
        args["target_logits"] = logits[:, :0]
        if args["draft_probs"] is not None:
            args["draft_probs"] = args["draft_probs"][:, :0]
        return Broken(kind, ("target_logits",), False)
    if kind.startswith("tokens"):
        tokens = args["draft_tokens"]
        if kind == "tokens_dtype":
            args["draft_tokens"] = tokens.to(rng.choice([torch.float32, torch.int16]))
            return Broken(kind, ("draft_tokens",), False)
        if kind == "tokens_shape":
            args["draft_tokens"] = torch.cat([tokens, tokens[:1]])
            return Broken(kind, ("draft_tokens",), False)
        bad = tokens.clone()
        bad[rng.randrange(total)] = rng.choice([-1, vocab, 2**31 - 1, -(2**31)])
        args["draft_tokens"] = bad
        return Broken(kind, ("draft_tokens",), True)
    if kind == "indptr_start":
        bad = args["qo_indptr"].clone()
        bad[0] = 1
        args["qo_indptr"] = bad
        return Broken(kind, ("qo_indptr", "parents"), True)
    if kind == "indptr_dtype":
        args["qo_indptr"] = args["qo_indptr"].to(I64)
        return Broken(kind, ("qo_indptr",), False)
    if kind.startswith("vocab_"):
        ids = args["draft_vocab"]
        if kind == "vocab_order":
            if ids.numel() < 2:
                return _give_up(args)
            args["draft_vocab"] = ids.flip(0) if rng.random() < 0.5 else torch.cat([ids[:1], ids[:-1]])
            return Broken(kind, ("draft_vocab",), True)
        if kind == "vocab_range":
            bad = ids.clone()
            bad[-1] = vocab + rng.randint(0, 3)
            args["draft_vocab"] = bad
            return Broken(kind, ("draft_vocab",), True)
        if kind == "vocab_columns":
            args["draft_vocab"] = torch.cat([ids, ids[-1:] + 1]) if rng.random() < 0.5 and ids.numel() < vocab \
                else ids[:-1] if ids.numel() > 1 else torch.cat([ids, ids])
            return Broken(kind, ("draft_vocab", "draft_probs"), False)
        args["draft_probs"] = None  # vocab_alone
        return Broken(kind, ("draft_vocab", "draft_probs"), False)
    if kind.startswith("probs"):
        probs = args["draft_probs"]
        if probs is None:
            probs = torch.softmax(torch.randn(total, vocab), -1)
        if kind == "probs_shape":
            args["draft_probs"] = torch.cat([probs, probs[:, :1]], 1)
            return Broken(kind, ("draft_probs",), False)
        if kind == "probs_dtype":
            args["draft_probs"] = probs.double()
            return Broken(kind, ("draft_probs",), False)
        read = sampled_rows(args)  # only sampled requests' rows are read and checked
        if not read:
            return _give_up(args)
        bad = probs.clone()
        bad[rng.choice(read), rng.randrange(probs.shape[1])] = -0.5 if kind == "probs_negative" else float("nan")
        args["draft_probs"] = bad
        return Broken(kind, ("draft_probs",), True)
    if kind in ("temperature_negative", "temperature_nan", "top_k_negative", "top_p_zero", "top_p_large"):
        name = kind.rsplit("_", 1)[0]
        value = {"temperature_negative": -0.5, "temperature_nan": float("nan"), "top_k_negative": -1,
                 "top_p_zero": 0.0, "top_p_large": 1.5}[kind]
        current = args[name]
        if isinstance(current, torch.Tensor):
            current = current.clone()
            current[rng.randrange(num_requests)] = value
            args[name] = current
        else:
            args[name] = value
        return Broken(kind, (name,), True)
    if kind in ("temperature_dtype", "top_k_dtype"):
        name = kind.rsplit("_", 1)[0]
        args[name] = args[name].to(torch.float64 if name == "temperature" else I64)
        return Broken(kind, (name,), False)
    if kind.startswith("uniforms"):
        uniforms = args["uniforms"] if args["uniforms"] is not None else torch.rand(total, 2, dtype=torch.float64)
        _drop_randomness(args)
        if kind == "uniforms_shape":
            args["uniforms"] = uniforms[:, :1]
            return Broken(kind, ("uniforms",), False)
        bad = uniforms.clone()
        bad[rng.randrange(total), rng.randrange(2)] = rng.choice([1.0, -0.1, float("nan"), 2.0])
        args["uniforms"] = bad
        return Broken(kind, ("uniforms",), True)
    if kind == "both_sources":
        _drop_randomness(args)
        args["uniforms"] = torch.rand(total, 2, dtype=torch.float64)
        args["seed"], args["offset"] = torch.zeros(num_requests, dtype=I64), torch.zeros(num_requests, dtype=I64)
        return Broken(kind, ("uniforms", "seed", "generator"), False)
    if kind == "seed_alone":
        _drop_randomness(args)
        args["seed"] = torch.zeros(num_requests, dtype=I64)
        return Broken(kind, ("seed", "offset"), False)
    if kind == "seed_dtype":
        _drop_randomness(args)
        args["seed"], args["offset"] = torch.zeros(num_requests, dtype=I32), torch.zeros(num_requests, dtype=I64)
        return Broken(kind, ("seed",), False)
    if kind == "no_randomness":
        _drop_randomness(args)
        temperature = args["temperature"]
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.clone()
            temperature[rng.randrange(num_requests)] = 1.0
            args["temperature"] = temperature
        else:
            args["temperature"] = 1.0
        return Broken(kind, ("uniforms", "seed", "generator", "temperature"), True)
    if kind == "max_nodes_zero":
        args["max_nodes"] = 0
        return Broken(kind, ("max_nodes",), False)
    if kind == "max_nodes_small":
        offsets = args["qo_indptr"].tolist()
        parents = args["parents"].tolist() if args["parents"] is not None else [-1] + list(range(len(offsets)))
        deepest = max(max(depths(parents[a:b]) if args["parents"] is not None else [b - a - 1], default=0)
                      for a, b in zip(offsets, offsets[1:]))
        if deepest == 0:
            args["max_nodes"] = 0
            return Broken("max_nodes_zero", ("max_nodes",), False)
        args["max_nodes"] = deepest
        return Broken(kind, ("max_nodes",), True)
    if kind.startswith("parents"):
        return break_parents(rng, args, kind) or _give_up(args)
    if kind == "device":
        name = rng.choice([n for n in ("draft_tokens", "qo_indptr", "parents", "draft_probs", "uniforms")
                           if isinstance(args.get(n), torch.Tensor)])
        args[name] = args[name].to("meta")
        return Broken(kind, (name,), False)
    if kind == "backend":
        args["backend"] = rng.choice(["tpu", "GPU", "x"])
        return Broken(kind, ("backend",), False)
    name = rng.choice(["target_logits", "draft_tokens", "qo_indptr"])
    args[name] = args[name].tolist()
    return Broken("list_arg", (name,), False)


def _drop_randomness(args) -> None:
    args["uniforms"] = args["seed"] = args["offset"] = args["generator"] = None


def _give_up(args) -> Broken:
    args["target_logits"] = args["target_logits"].double()
    return Broken("logits_dtype", ("target_logits",), False)
