"""Fixtures shared by the tests.

Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors; the variable must be set
before any Triton kernel is imported, hence here. With a GPU the "triton" backend's tests run on
CUDA tensors at the same shapes (see `device_of`).
"""

import importlib
import inspect
import os

import pytest

# Under pytest-xdist (the README's test command runs two workers) each worker gets its share of the cores:
# torch's and the kernels' OpenMP threads of two workers would otherwise spin against each other. The kernels'
# work split never depends on the thread count (batch invariance), so results are the same at any count;
# tests/test_kernel_threads.py runs every C++ kernel at 1, 2 and 3 threads and checks exactly that.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads once)

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _patch_triton_language_once() -> None:
    """Triton's interpreter patches triton.language for a launch and restores it afterwards, but it also
    re-patches it on every call of a @triton.jit helper inside the kernel (inspect.getmembers over the
    module, ~2 ms a call, ~40% of an interpreted test), although the launch's patch is still in force.
    Skip the re-patch only when every language module the helper sees (triton.language, and its core
    for Triton's own helpers such as tl.zeros) is patched already. Should the skip ever be wrong, the
    helper would call unpatched builtins, which raise: a failure, never a silently different result."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang, scope = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or scope is None or not tl.core.is_builtin(tl.program_id):
        return  # another Triton than the one this was written against (3.x): leave it alone

    langs_of = {}  # a function's language modules, found once (a scan of its globals)

    def patch_lang_once(fn):
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = [value for value in fn.__globals__.values()
                                    if inspect.ismodule(value) and value in (tl, tl.core)]
        if langs and not any(tl.core.is_builtin(lang.program_id) for lang in langs):
            return scope()  # every language module this function sees is patched already
        return patch_lang(fn)

    interpreter._patch_lang = patch_lang_once


if INTERPRETED:
    _patch_triton_language_once()

# Every backend this machine can run. The C++ one must be built and Triton installed (the dev extra
# brings it): a missing one fails its tests instead of silently testing the reference twice. The CUDA
# kernels join on a GPU machine whose dspark._C was built with CUDA (setup.py does so when torch has
# CUDA and nvcc is found).
CUDA_KERNELS = GPU and bool(getattr(importlib.import_module("dspark._C"), "with_cuda", False))
BACKENDS = ["reference", "cpu", "triton"] + (["cuda"] if CUDA_KERNELS else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def device_of(backend: str) -> torch.device:
    """Where a backend's inputs live in the tests: Triton on the GPU when there is one, CUDA always."""
    if backend == "cuda":
        return torch.device("cuda")
    return torch.device("cuda" if backend == "triton" and GPU and not INTERPRETED else "cpu")


@pytest.fixture(scope="session", autouse=True)
def private_profile_cache(tmp_path_factory):
    """SPS profiles the tests measure stay in a temp dir, never in the user's ~/.cache."""
    if "DSPARK_CACHE_DIR" not in os.environ:
        os.environ["DSPARK_CACHE_DIR"] = str(tmp_path_factory.mktemp("dspark-cache"))
    yield
