"""rejection_sample: decides, losslessly, which draft tokens each request keeps (DESIGN.md, op 2).

Registered as `torch.ops.dspark.rejection_sample`; `dspark.ops.rejection_sample` is the friendly
wrapper (scalars or per-request tensors for the sampling parameters; a torch.Generator, a seed or
explicit uniforms for the randomness).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

from dspark.reference.rejection_sample import rejection_sample as reference_rejection_sample
from dspark.ops import _validation as v
from dspark.ops._backend import check_backend_name, choose_backend, cpu_extension, preferred_backend


def _check_shapes(target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature, top_k, top_p,
                  uniforms, seed, offset, max_nodes, draft_vocab=None) -> None:
    v.check_tensor("target_logits", target_logits, dtypes=v.FLOAT_DTYPES, ndim=2)
    device = target_logits.device
    num_tokens, vocab = target_logits.shape
    if vocab == 0:
        v.fail("target_logits must have a vocabulary of at least one token")
    v.check_tensor("draft_tokens", draft_tokens, dtypes=(torch.int64, torch.int32), ndim=1, shape=(num_tokens,),
                   device=device)
    v.check_qo_indptr(qo_indptr, num_tokens, device)  # n_r = 0: an idle request, nothing accepted
    num_requests = qo_indptr.shape[0] - 1
    v.check_parents(parents, qo_indptr, num_tokens, device)
    if draft_vocab is not None:
        v.check_tensor("draft_vocab", draft_vocab, dtypes=(torch.int64, torch.int32), ndim=1, device=device)
        if draft_probs is None:
            v.fail("draft_vocab describes draft_probs' columns: pass draft_probs with it")
        if not 1 <= draft_vocab.shape[0] <= vocab:
            v.fail(f"draft_vocab must hold 1 to {vocab} token ids, got {draft_vocab.shape[0]}")
    if draft_probs is not None:
        columns = vocab if draft_vocab is None else draft_vocab.shape[0]
        v.check_tensor("draft_probs", draft_probs, dtypes=v.FLOAT_DTYPES, ndim=2, shape=(num_tokens, columns),
                       device=device)
    v.check_tensor("temperature", temperature, dtypes=(torch.float32,), ndim=1, shape=(num_requests,), device=device)
    v.check_tensor("top_k", top_k, dtypes=(torch.int32,), ndim=1, shape=(num_requests,), device=device)
    v.check_tensor("top_p", top_p, dtypes=(torch.float32,), ndim=1, shape=(num_requests,), device=device)
    if uniforms is not None:
        v.check_tensor("uniforms", uniforms, dtypes=(torch.float64, torch.float32), ndim=2, shape=(num_tokens, 2),
                       device=device)
    if uniforms is not None and (seed is not None or offset is not None):
        v.fail("pass one source of randomness: uniforms, or seed with offset, not both")
    if (seed is None) != (offset is None):
        v.fail(f"seed and offset go together; got only {'seed' if offset is None else 'offset'}")
    for name, t in (("seed", seed), ("offset", offset)):
        if t is not None:
            v.check_tensor(name, t, dtypes=(torch.int64,), ndim=1, shape=(num_requests,), device=device)
    if max_nodes < 1:
        v.fail(f"max_nodes must be >= 1, got {max_nodes}")


def _check_values(target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature, top_k, top_p,
                  uniforms, seed, offset, max_nodes, draft_vocab=None) -> None:
    if not v.values_checked(target_logits):
        return
    vocab = target_logits.shape[1]
    v.check_finite_logits("target_logits", target_logits)
    if draft_tokens.numel() and not (0 <= int(draft_tokens.min()) and int(draft_tokens.max()) < vocab):
        bad = int(torch.nonzero((draft_tokens < 0) | (draft_tokens >= vocab))[0])
        v.fail(f"draft_tokens[{bad}] = {int(draft_tokens[bad])} is outside the vocabulary [0, {vocab})")
    if not (torch.isfinite(temperature).all() and (temperature >= 0).all()):
        v.fail(f"temperature must be finite and >= 0, got {temperature.tolist()}")
    if (top_k < 0).any():
        v.fail(f"top_k must be >= 0 (0 = off), got {top_k.tolist()}")
    if not ((top_p > 0) & (top_p <= 1)).all():
        v.fail(f"top_p must lie in (0, 1], got {top_p.tolist()}")
    if bool((temperature > 0).any()) and uniforms is None and (seed is None or offset is None):
        v.fail("sampled requests (temperature > 0) need randomness: pass uniforms, seed and offset, or a generator")
    if draft_vocab is not None and draft_vocab.numel():
        ids = draft_vocab.long()
        if not (int(ids[0]) >= 0 and int(ids[-1]) < vocab and bool((ids[1:] > ids[:-1]).all())):
            v.fail(f"draft_vocab must hold strictly increasing token ids in [0, {vocab})")
    if draft_probs is not None and draft_probs.numel():
        # Only sampled requests' rows are read (greedy walks never look at q): only they are checked.
        counts = (qo_indptr[1:] - qo_indptr[:-1]).long().cpu()
        read = torch.repeat_interleave(temperature.cpu() > 0, counts).to(draft_probs.device)
        rows = draft_probs if bool(read.all()) else draft_probs[read]
        if rows.numel():
            low, high = torch.aminmax(rows)  # one pass; NaN propagates to both
            if not (bool(low >= 0) and bool(torch.isfinite(high))):
                v.fail("draft_probs must be finite and non-negative (in the rows of sampled requests)")
    if uniforms is not None and not ((uniforms >= 0) & (uniforms < 1)).all():
        v.fail("uniforms must lie in [0, 1)")
    deepest = max(v.request_depths(parents, qo_indptr))
    if deepest + 1 > max_nodes:
        v.fail(f"max_nodes = {max_nodes} cannot hold an accepted path of {deepest + 1} nodes")


@torch.library.custom_op("dspark::rejection_sample", mutates_args=())
def _rejection_sample_op(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    qo_indptr: torch.Tensor,
    parents: torch.Tensor | None,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor | None,
    seed: torch.Tensor | None,
    offset: torch.Tensor | None,
    max_nodes: int,
    backend: str = "auto",
    draft_vocab: torch.Tensor | None = None,
    trusted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature, top_k, top_p, uniforms,
            seed, offset, max_nodes, draft_vocab)
    _check_shapes(*args)
    if not trusted:
        _check_values(*args)
    draft_tokens = draft_tokens.long()
    uniforms = None if uniforms is None else uniforms.double()
    chosen = choose_backend(None if backend == "auto" else backend, target_logits.device)
    if draft_vocab is not None and chosen != "cpu":
        # Only the C++ CPU kernel reads rows over a draft vocabulary; the others get them widened.
        draft_probs = draft_probs.new_zeros(draft_probs.shape[0], target_logits.shape[1]).index_copy_(
            1, draft_vocab.long(), draft_probs)
        draft_vocab = None
    if chosen == "reference":
        return reference_rejection_sample(target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature,
                                          top_k, top_p, uniforms, seed, offset, max_nodes)
    if chosen == "triton":
        from dspark.triton_kernels.rejection_sampling import rejection_sample as triton_rejection_sample

        return triton_rejection_sample(target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature,
                                       top_k, top_p, uniforms, seed, offset, max_nodes)
    return _run_extension(chosen, target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature, top_k,
                          top_p, uniforms, seed, offset, max_nodes, draft_vocab)


def _run_extension(chosen, target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature, top_k, top_p,
                   uniforms, seed, offset, max_nodes, draft_vocab):
    """The C++ (chosen == "cpu") or CUDA kernel on checked shapes; they write caller-allocated outputs."""
    num_requests = qo_indptr.shape[0] - 1
    device = target_logits.device
    accepted_nodes = torch.empty(num_requests, max_nodes, dtype=torch.int32, device=device)
    num_accepted = torch.empty(num_requests, dtype=torch.int32, device=device)
    output_tokens = torch.empty(num_requests, max_nodes, dtype=torch.int64, device=device)

    def contiguous(t):
        return None if t is None else t.contiguous()

    kernel = cpu_extension.rejection_sample_cuda if chosen == "cuda" else cpu_extension.rejection_sample
    kernel(
        target_logits.contiguous(), draft_tokens.contiguous(), qo_indptr.contiguous(), contiguous(parents),
        contiguous(draft_probs), temperature.contiguous(), top_k.contiguous(), top_p.contiguous(),
        contiguous(uniforms), contiguous(seed), contiguous(offset), accepted_nodes, num_accepted, output_tokens,
        *(() if chosen == "cuda" else (None if draft_vocab is None else draft_vocab.long().contiguous(),)),
    )
    return accepted_nodes, num_accepted, output_tokens


@_rejection_sample_op.register_fake
def _(target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature, top_k, top_p, uniforms, seed,
      offset, max_nodes, backend="auto", draft_vocab=None, trusted=False):
    check_backend_name(backend)
    _check_shapes(target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature, top_k, top_p, uniforms,
                  seed, offset, max_nodes, draft_vocab)
    num_requests = qo_indptr.shape[0] - 1
    new = target_logits.new_empty
    return (new(num_requests, max_nodes, dtype=torch.int32), new(num_requests, dtype=torch.int32),
            new(num_requests, max_nodes, dtype=torch.int64))


def _per_request(name: str, value, num_requests: int, dtype: torch.dtype, default, device) -> torch.Tensor:
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1)
        if value.dtype.is_floating_point != dtype.is_floating_point or value.dtype == torch.bool:
            v.fail(f"{name} must be a {'float' if dtype.is_floating_point else 'integer'} tensor, got {value.dtype}")
        if value.dim() != 1 or value.numel() not in (1, num_requests):
            v.fail(f"{name} must be a scalar or hold one value per request ({num_requests}), got shape "
                   f"{tuple(value.shape)}")
        return value.to(device=device, dtype=dtype).expand(num_requests).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        v.fail(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if not dtype.is_floating_point and not isinstance(value, int):
        v.fail(f"{name} must be an integer, got {value!r}")
    return torch.full((num_requests,), value, dtype=dtype, device=device)


def _filters_on(top_k, top_p) -> bool | None:
    """Whether any request uses top-k or top-p, when that is known without reading the GPU."""
    def on_host(x):
        return x is None or not isinstance(x, torch.Tensor) or x.device.type == "cpu"
    if not (on_host(top_k) and on_host(top_p)):
        return None
    try:
        k = top_k if isinstance(top_k, torch.Tensor) else torch.tensor(0 if top_k is None else top_k)
        p = top_p if isinstance(top_p, torch.Tensor) else torch.tensor(1.0 if top_p is None else top_p)
        return bool((k > 0).any()) or bool((p < 1).any())
    except (TypeError, RuntimeError):  # a malformed value: _per_request names it
        return None


class RejectionSamplePlan:
    """rejection_sample for a caller that builds every round's inputs itself (the engine): the backend is
    chosen once, by `plan_rejection_sample`, and `run` takes the op's own tensor forms only, so it skips
    the wrapper's argument handling and, on the C++ backend, the custom-op dispatch. Shapes, dtypes and
    devices are still checked (the kernels index by them); values are not, as with `trusted=True`."""

    def __init__(self, backend: str, device: torch.device):
        self.backend, self.device = backend, device

    def run(self, target_logits: torch.Tensor, draft_tokens: torch.Tensor, qo_indptr: torch.Tensor,
            parents: torch.Tensor | None, draft_probs: torch.Tensor | None, temperature: torch.Tensor,
            top_k: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, max_nodes: int,
            draft_vocab: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One round: draft_tokens int64 [T], qo_indptr int32 [R + 1], parents int32 [T] or None, draft_probs
        [T, V] (or [T, V_d] over draft_vocab) or None, temperature float32 / top_k int32 / top_p float32 /
        seed and offset int64, each [R], on the planned device. Returns what rejection_sample returns."""
        if target_logits.device != self.device:
            v.fail(f"target_logits must be on {self.device} (the plan's device), got {target_logits.device}")
        if self.backend != "cpu":
            return torch.ops.dspark.rejection_sample(target_logits, draft_tokens, qo_indptr, parents, draft_probs,
                                                     temperature, top_k, top_p, None, seed, offset, max_nodes,
                                                     self.backend, draft_vocab, True)
        _check_shapes(target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature, top_k, top_p, None,
                      seed, offset, max_nodes, draft_vocab)
        return _run_extension("cpu", target_logits, draft_tokens.long(), qo_indptr, parents, draft_probs,
                              temperature, top_k, top_p, None, seed, offset, max_nodes, draft_vocab)


def plan_rejection_sample(device: torch.device | str, backend: str | None = None) -> RejectionSamplePlan:
    """A RejectionSamplePlan for tensors on `device`; backend as rejection_sample's `backend=` (default:
    the fastest available, or DSPARK_BACKEND), chosen now."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # tensors on "cuda" report their index
        device = torch.device("cuda", torch.cuda.current_device())
    if backend is not None:
        check_backend_name(backend)
    return RejectionSamplePlan(choose_backend(backend, device), device)


def _random_source(generator, seed, offset, uniforms, num_nodes: int, num_requests: int, device):
    """The kernel's randomness from at most one of a generator (drawn into uniforms [T, 2] here), per-request
    Philox seeds (with offsets, [R] each) or uniforms: (uniforms, seed, offset), the unused ones None."""
    given = [name for name, x in (("generator", generator), ("seed", seed), ("uniforms", uniforms)) if x is not None]
    if len(given) > 1:
        v.fail(f"pass one source of randomness, got {' and '.join(given)}")
    if offset is not None and seed is None:
        v.fail("offset needs a seed: the Philox stream is (seed, offset)")
    if generator is not None:
        uniforms = torch.rand(num_nodes, 2, dtype=torch.float64, generator=generator, device=generator.device).to(device)
    if seed is not None:
        seed = _per_request("seed", seed, num_requests, torch.int64, 0, device)
        offset = _per_request("offset", offset, num_requests, torch.int64, 0, device)
    return uniforms, seed, offset


def rejection_sample(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    qo_indptr: torch.Tensor,
    parents: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: float | torch.Tensor | None = None,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    max_nodes: int | None = None,
    backend: str | None = None,
    draft_vocab: torch.Tensor | None = None,
    trusted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Judge every request's drafts against the target; returns (accepted_nodes [R, W] int32,
    num_accepted [R] int32, output_tokens [R, W] int64), rows padded with -1, W = max_nodes. A request
    with no nodes (n_r = 0: a cache row idle this round) accepts nothing: num_accepted 0, rows all -1.

    temperature (default 1; 0 = greedy), top_k (default 0 = off) and top_p (default 1 = off) are
    scalars or [R] tensors. Randomness, for sampled requests: `uniforms` [T, 2] in [0, 1); or a
    per-request `seed` with a per-round `offset` (Philox, reproducible on every backend); or a
    `generator` from which the uniforms are drawn. max_nodes: the output width, at least the
    deepest path + 1; None reads the largest n_r from qo_indptr (a host read on GPU).

    draft_probs [T, V] (None: deterministic proposals): row u is the distribution node u's children were
    drawn from. Rows of greedy requests (temperature 0) are never read, nor checked: a caller may leave
    them unwritten (torch.empty), so greedy requests cost no [n_r, V] rows. draft_vocab [V_d] (strictly
    increasing token ids): a drafter over a subset of the vocabulary passes draft_probs [T, V_d] over
    those ids, q being 0 elsewhere (read as such on the CPU; widened for the other backends).

    trusted: skip the checks that read values on the host (id ranges, NaN, parents, orderings; on
    accelerators they run only with DSPARK_DEBUG=1 anyway): for callers that built the inputs themselves,
    as the engine does each round. Shapes, dtypes and devices are still checked; the C++ kernel stays in
    bounds whatever the values (out-of-range draft tokens are rejected, parents outside [0, i) ignored,
    rows without finite mass treated as one-hot at their argmax).
    """
    v.check_tensors(target_logits=target_logits, draft_tokens=draft_tokens, qo_indptr=qo_indptr,
                    **{name: t for name, t in (("parents", parents), ("draft_probs", draft_probs),
                                               ("uniforms", uniforms), ("draft_vocab", draft_vocab)) if t is not None})
    device = target_logits.device
    num_requests = qo_indptr.shape[0] - 1 if qo_indptr.dim() == 1 else -1
    if num_requests < 1:
        v.fail(f"qo_indptr must be a 1-D tensor of R + 1 >= 2 offsets, got shape {tuple(qo_indptr.shape)}")
    if backend is None and device.type == "cuda":  # the host check costs a CPU round for nothing
        backend = preferred_backend("rejection_sample", device, _filters_on(top_k, top_p))
    temperature = _per_request("temperature", temperature, num_requests, torch.float32, 1.0, device)
    top_k = _per_request("top_k", top_k, num_requests, torch.int32, 0, device)
    top_p = _per_request("top_p", top_p, num_requests, torch.float32, 1.0, device)
    uniforms, seed, offset = _random_source(generator, seed, offset, uniforms, target_logits.shape[0], num_requests,
                                            device)
    v.check_tensor("qo_indptr", qo_indptr, dtypes=(torch.int32,), ndim=1, device=device)
    if max_nodes is None:
        if qo_indptr.device.type == "meta" or isinstance(qo_indptr, FakeTensor):
            v.fail("max_nodes must be given when qo_indptr holds no data (meta or fake tensors, tracing)")
        max_nodes = max(int((qo_indptr[1:] - qo_indptr[:-1]).max()), 1)
    return torch.ops.dspark.rejection_sample(target_logits, draft_tokens, qo_indptr, parents, draft_probs,
                                             temperature, top_k, top_p, uniforms, seed, offset, max_nodes,
                                             backend or "auto", draft_vocab, trusted)
