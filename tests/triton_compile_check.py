"""Compiles every Triton kernel for a real GPU target (sm_90) without a GPU.

The interpreter that runs our kernels in CI accepts code the compiler refuses (non-constexpr globals,
dtype mixes, unsupported ops); this catches those. Run in a subprocess without TRITON_INTERPRET, by
tests/test_triton_compile.py. Each case names pointer dtypes and constexprs; other args are int32.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dspark.triton_kernels import kv_cache, rejection_sampling, tree_attention  # noqa: E402

FLOAT_ARGS = {"scale_log2"}


def signature(fn, pointers: dict, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers or name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*i32")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def attention_cases():
    for dtype, paged, tree, split in (("bf16", True, True, True), ("fp16", False, True, False),
                                      ("fp32", False, False, False), ("bf16", True, False, False)):
        pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "lse_ptr": "*fp32",
                    "out_ptr": "*fp32" if split else f"*{dtype}"}
        consts = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=32, BLOCK_N=64, BLOCK_SIZE=16 if paged else 1,
                      PAGED=paged, TREE=tree, SPLIT=split, IEEE=dtype == "fp32", UPCAST=False)
        yield tree_attention._tree_attention_kernel, pointers, consts
    # A head_dim below 16, padded to BLOCK_D = 16 and masked: Triton 3.6 (the GPU machine's) requires
    # tl.dot's K >= 16; the interpreter, and Triton 3.9's compiler here, accept less.
    small = dict(GROUP=2, HEAD_DIM=8, BLOCK_D=16, BLOCK_M=16, BLOCK_N=32, BLOCK_SIZE=1, PAGED=False, TREE=True,
                 SPLIT=False, IEEE=True, UPCAST=False)
    yield tree_attention._tree_attention_kernel, {"q_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32",
                                                  "lse_ptr": "*fp32", "out_ptr": "*fp32"}, small
    yield tree_attention._ancestor_words_kernel, {}, dict(BLOCK_NODES=16, BLOCK_WORDS=2)
    yield (tree_attention._merge_splits_kernel, {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"},
           dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=4, UPCAST=False))


def rollback_cases():
    for paged, has_v in ((False, True), (True, False)):
        pointers = {"k_ptr": "*i16", "v_ptr": "*i16"}
        consts = dict(MAX_PATH=8, BLOCK=256, BLOCK_SIZE=16 if paged else 1, PAGED=paged, HAS_V=has_v, FLAT_ROW=True)
        yield kv_cache._rollback_kernel, pointers, consts


def sampling_cases():
    pointers = {"logits_ptr": "*bf16", "tokens_ptr": "*i64", "q_ptr": "*fp32", "temperature_ptr": "*fp32",
                "top_p_ptr": "*fp32", "uniforms_ptr": "*fp64", "seed_ptr": "*i64", "offset_ptr": "*i64",
                "zbuf_ptr": "*fp64", "nodes_out": "*i32", "count_out": "*i32", "tokens_out": "*i64",
                "stats_ptr": "*fp64"}
    yield rejection_sampling._row_stats_kernel, pointers, dict(BLOCK=512, RADIX_BITS=4, CAP=1024)
    for tree, has_q, has_uniforms in ((True, True, False), (False, False, True), (False, True, False)):
        consts = dict(BLOCK=512, W_BLOCK=8, CAP=1024, HAS_PARENTS=tree, HAS_Q=has_q,
                      HAS_UNIFORMS=has_uniforms, HAS_SEED=not has_uniforms)
        yield rejection_sampling._rejection_sample_kernel, pointers, consts


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failures = 0
    for fn, pointers, consts in [*attention_cases(), *sampling_cases(), *rollback_cases()]:
        try:
            triton.compile(ASTSource(fn=fn, signature=signature(fn, pointers, consts), constexprs=consts),
                           target=target)
            print(f"ok {fn.__name__} {consts}")
        except Exception as error:  # report every failing kernel, not just the first
            failures += 1
            print(f"FAILED {fn.__name__} {consts}: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
