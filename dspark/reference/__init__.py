"""Pure-PyTorch references of the three ops: the executable spec every backend is tested against.

They are written to be read, not to be fast; they compute in float32 for half inputs and are exact
in float64 when given float64 tensors.
"""

from dspark.reference.kv_rollback import kv_rollback
from dspark.reference.rejection_sample import rejection_sample
from dspark.reference.tree_attention import tree_attention

__all__ = ["tree_attention", "rejection_sample", "kv_rollback"]
