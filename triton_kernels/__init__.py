"""Triton kernels of DSpark, installed as `dspark.triton_kernels` (never as a top-level package).

Empty until the Triton issue lands: dspark.ops reports no "triton" backend yet.
"""
