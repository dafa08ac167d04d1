"""DSpark: speculative decoding with fused tree attention, lossless rejection sampling and in-place
KV rollback. The three ops live in `dspark.ops` (also as `torch.ops.dspark.*`)."""

from dspark import ops
from dspark.ops import kv_rollback, rejection_sample, tree_attention

__version__ = "0.1.0"
__all__ = ["ops", "tree_attention", "rejection_sample", "kv_rollback"]
