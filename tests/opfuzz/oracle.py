"""Builds one fuzz case from its seed and judges one backend on it.

Verdicts: "valid" and "invalid" pass (the op matched the reference, or raised a ValueError naming the
broken argument and changed nothing). Failures: "mismatch" (valid input, output differs from the
reference), "corruption" (memory outside what the op may write changed, or what it writes differs
from the reference), "accepted-invalid" (no error for a broken input), "rejected-valid" (ValueError
for a valid one), "unnamed" (a ValueError that does not name the argument), "error" (any other
exception). Crashes and hangs are caught one level up, by the runner's worker processes.
"""

from __future__ import annotations

import random
import re
import traceback

import torch

from dspark import ops
from opfuzz.attention import break_tree_attention, tree_attention_case
from opfuzz.common import Broken, Case, GeneratorSeed, Placer
from opfuzz.rollback import break_kv_rollback, kv_rollback_case
from opfuzz.sampling import break_rejection_sample, rejection_sample_case

OPS = {
    "tree_attention": (tree_attention_case, break_tree_attention, ("k_cache", "v_cache")),
    "rejection_sample": (rejection_sample_case, break_rejection_sample, ()),
    "kv_rollback": (kv_rollback_case, break_kv_rollback, ("k_cache", "v_cache")),
}
MUTATED = {"kv_rollback": ("k_cache", "v_cache", "cache_seqlens")}
PASSING = ("valid", "invalid")
# Backend vs reference, |out - ref| <= atol + rtol |ref|: both round an fp32 result to the output dtype.
TOLERANCE = {torch.float32: (1e-4, 2e-5), torch.float16: (2.0**-9, 2e-3), torch.bfloat16: (2.0**-6, 2e-2)}


def make_case(op: str, seed: int, backend: str, device: str = "cpu") -> Case:
    rng, gen = random.Random(f"{op}/{seed}"), torch.Generator().manual_seed(seed)
    build, breaker, paired = OPS[op]
    entries = ["wrapper", "wrapper", "custom_op"] + (["plan"] if op == "tree_attention" else [])
    entry = rng.choice(entries)
    args, label = build(rng, gen, backend, entry)
    case = Case(op, seed, entry, args, label, mutated=MUTATED.get(op, ()))
    _place(case, rng, paired, torch.device(device))
    if rng.random() < 0.5:
        case.broken = breaker(rng, case.args, entry)
    shapes_only = case.entry != "plan" and (case.broken is None or case.broken.label != "device")
    if rng.random() < 0.08 and shapes_only:  # the same call on meta tensors, as under tracing
        if (case.op == "rejection_sample" and case.args["max_nodes"] is None  # meta holds no n_r to read
                and isinstance(case.args["qo_indptr"], torch.Tensor)):
            indptr = case.args["qo_indptr"]
            case.args["max_nodes"] = int((indptr[1:] - indptr[:-1]).max()) if indptr.numel() > 1 else 1
        case.args = {name: _to_meta(value) for name, value in case.args.items()}
        case.buffers = {}
        case.label += " meta"
    return case


def _to_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _place(case: Case, rng: random.Random, paired: tuple[str, ...], device: torch.device) -> None:
    """Every tensor into a sentinel-padded buffer; paired caches share one layout (the kernels need
    equal strides); k and v as halves of one buffer when the case asks for it."""
    placer = Placer(rng, device)
    halves = case.args.pop("halves", False)
    pair_layout = rng.choice(["tight", "tight", "offset", "strided"])
    pair_seed = rng.randrange(2**31)
    for name, value in list(case.args.items()):
        if not isinstance(value, torch.Tensor):
            continue
        if name in paired and halves:
            continue
        layout = pair_layout if name in paired else None
        if name in paired:
            placer.rng = random.Random(pair_seed)
        view, buffer = placer.place(value, layout)
        placer.rng = rng
        case.args[name], case.buffers[name] = view, buffer
    if halves and case.args.get("v_cache") is not None:
        both = torch.stack([case.args["k_cache"], case.args["v_cache"]])
        view, buffer = placer.place(both, "offset")
        case.args["k_cache"], case.args["v_cache"] = view[0], view[1]
        case.buffers["k_cache"] = case.buffers["v_cache"] = buffer


def backend_refusal(case: Case, backend: str) -> Broken | None:
    """What a backend refuses beyond the shared validation: the C++ kernels read caches (and write
    lengths) by pointer, Triton's attention needs a unit-stride head_dim and equal K/V strides."""
    args = case.args
    if case.op == "rejection_sample" or any(isinstance(t, torch.Tensor) and t.device.type == "meta"
                                             for t in args.values()):
        return None
    k, v = args["k_cache"], args["v_cache"]
    if backend in ("cpu", "cuda"):
        names = ("k_cache", "v_cache") + (("cache_seqlens",) if case.op == "kv_rollback" else ())
        if any(args[n] is not None and not args[n].is_contiguous() for n in names):
            return Broken("non-contiguous for a pointer kernel", names, False)
    if backend == "triton" and case.op == "tree_attention" and (k.stride(-1) != 1 or v.stride() != k.stride()):
        return Broken("triton needs unit-stride head_dim", ("k_cache", "v_cache"), False)
    return None


def _materialise(args: dict, backend: str) -> dict:
    out = {name: torch.Generator().manual_seed(v.seed) if isinstance(v, GeneratorSeed) else v
           for name, v in args.items()}
    out.setdefault("backend", backend)
    return out


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def call(case: Case, args: dict):
    a = args
    if case.op == "tree_attention":
        names = ("q", "k_cache", "v_cache", "qo_indptr", "cache_seqlens", "parents", "block_table", "sm_scale")
        if case.entry == "custom_op":
            return torch.ops.dspark.tree_attention(*(a[n] for n in names), a["backend"])
        if case.entry == "plan":  # plan once, then two layers with different queries
            q = a["q"]
            plan = ops.plan_tree_attention(a["qo_indptr"], a["cache_seqlens"], a["parents"], a["block_table"],
                                           num_tokens=q.shape[0], num_q_heads=q.shape[1], k_cache=a["k_cache"],
                                           backend=a["backend"])
            return (plan.run(q, a["k_cache"], a["v_cache"], a["sm_scale"]),
                    plan.run(a["q2"], a["k_cache"], a["v_cache"], a["sm_scale"]))
        return ops.tree_attention(*(a[n] for n in names), backend=a["backend"])
    if case.op == "rejection_sample":
        if case.entry == "custom_op":
            names = ("target_logits", "draft_tokens", "qo_indptr", "parents", "draft_probs", "temperature", "top_k",
                     "top_p", "uniforms", "seed", "offset", "max_nodes")
            return torch.ops.dspark.rejection_sample(*(a[n] for n in names), a["backend"], a.get("draft_vocab"))
        return ops.rejection_sample(**a)
    names = ("k_cache", "v_cache", "cache_seqlens", "accepted_nodes", "num_accepted", "block_table")
    if case.entry == "custom_op":
        return torch.ops.dspark.kv_rollback(*(a[n] for n in names), a["backend"])
    return ops.kv_rollback(**a)


def _names(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def judge(case: Case, backend: str) -> tuple[str, str]:
    """(verdict, detail) of `backend` on the case."""
    broken = case.broken or backend_refusal(case, backend)
    meta = any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in case.args.values())
    if broken is not None and meta and broken.needs_values:
        broken = None  # a value check cannot run on meta tensors: the op must still return shapes
    if case.entry == "plan":
        q = case.args["q"]
        case.args["q2"] = torch.randn(q.shape).to(q.dtype).to(q.device) if q.dtype.is_floating_point else q
    before = {id(b): b.clone() for b in case.buffers.values()}
    expected = None
    if broken is None and not meta:
        expected = _reference(case)
    try:
        result = call(case, _materialise(case.args, backend))
    except ValueError as error:
        if broken is None:
            return "rejected-valid", str(error)
        if not _names(str(error), broken.names):
            return "unnamed", f"{broken.label}: expected one of {broken.names} in: {error}"
        changed = [n for n, b in case.buffers.items() if not torch.equal(_bits(b), _bits(before[id(b)]))]
        return ("corruption", f"{broken.label}: raised but changed {changed}") if changed else ("invalid", broken.label)
    except Exception as error:  # noqa: BLE001 - any other exception is the finding
        return "error", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=4)}"
    if broken is not None:
        return "accepted-invalid", broken.label
    if meta:
        return _check_meta(case, result)
    return _compare(case, result, expected, before)


def _reference(case: Case):
    args = {n: _clone(v) for n, v in case.args.items() if n != "q2"}
    args = {n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in args.items()}
    args = _materialise(args, "reference")
    args["backend"] = "reference"
    plain = Case(case.op, case.seed, "wrapper", args, case.label)
    out = call(plain, args)
    if case.op == "kv_rollback":
        return {n: args[n] for n in MUTATED["kv_rollback"] if args[n] is not None}
    if case.entry == "plan":
        args["q"] = case.args["q2"].cpu()
        return out, call(plain, args)
    return out


def _check_meta(case: Case, result) -> tuple[str, str]:
    if case.op == "tree_attention":
        outs = result if isinstance(result, tuple) else (result,)
        ok = all(o.shape == case.args["q"].shape for o in outs)
    elif case.op == "rejection_sample":
        R = case.args["qo_indptr"].shape[0] - 1
        ok = result[1].shape == (R,) and result[0].shape == result[2].shape and result[0].shape[0] == R
    else:
        ok = result is None
    return ("valid", "meta") if ok else ("mismatch", "meta output shapes")


def _close(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None when out matches the reference within the tolerance of its dtype, else what is off."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"shape/dtype {tuple(out.shape)} {out.dtype} vs {tuple(ref.shape)} {ref.dtype}"
    rtol, atol = TOLERANCE[out.dtype]
    out, ref = out.detach().cpu().double(), ref.double()
    if out.numel() == 0:
        return None
    bad = ~((out - ref).abs() <= atol + rtol * ref.abs())
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        return f"{int(bad.sum())} elements off, e.g. {out.flatten()[i].item()} vs {ref.flatten()[i].item()}"
    return None


def _compare(case: Case, result, expected, before) -> tuple[str, str]:
    if case.op == "tree_attention":
        pairs = zip(result, expected) if case.entry == "plan" else [(result, expected)]
        for out, ref in pairs:
            problem = _close(out, ref)
            if problem:
                return "mismatch", problem
    elif case.op == "rejection_sample":
        for name, out, ref in zip(("accepted_nodes", "num_accepted", "output_tokens"), result, expected):
            if not torch.equal(out.cpu(), ref):
                return "mismatch", f"{name}: {out.cpu().tolist()} vs reference {ref.tolist()}"
    writes = expected if case.op == "kv_rollback" else {}
    return _check_buffers(case, writes, before)


def _check_buffers(case: Case, writes: dict, before: dict) -> tuple[str, str]:
    """Every buffer equals its snapshot, except the views the op writes, which equal the reference."""
    expected_buffers = {}
    for name, buffer in case.buffers.items():
        want = expected_buffers.setdefault(id(buffer), before[id(buffer)].clone())
        if name in writes:
            view = case.args[name]
            region = want.as_strided(view.shape, view.stride(), view.storage_offset() - buffer.storage_offset())
            region.copy_(writes[name].to(want.device))
    for name, buffer in case.buffers.items():
        if not torch.equal(_bits(buffer), _bits(expected_buffers[id(buffer)])):
            diff = (_bits(buffer) != _bits(expected_buffers[id(buffer)])).nonzero().flatten()
            return "corruption", f"{name}'s buffer differs at bytes {diff[:8].tolist()} (of {diff.numel()})"
    return "valid", ""
