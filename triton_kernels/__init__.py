"""Triton kernels of DSpark, installed as `dspark.triton_kernels` (never as a top-level package).

One file per op, each holding its kernels and launcher; dspark.ops dispatches here for CUDA tensors,
and for CPU tensors under TRITON_INTERPRET=1 when `backend="triton"` is asked for. The launchers take
inputs that dspark.ops has already validated.
"""
