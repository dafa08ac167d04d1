"""The public kernels of DSpark (DESIGN.md, "The three ops").

Each op validates its inputs, picks a backend (`backend=` or DSPARK_BACKEND; default: the fastest
available for the tensors' device) and is registered as a torch custom op `torch.ops.dspark.<op>`
with a fake implementation, so torch.compile and other serving stacks can call it directly.
"""

from dspark.ops._backend import BACKENDS, choose_backend
from dspark.ops.kv_rollback import kv_rollback
from dspark.ops.rejection_sample import RejectionSamplePlan, plan_rejection_sample, rejection_sample
from dspark.ops.tree_attention import TreeAttentionPlan, plan_tree_attention, tree_attention

__all__ = ["tree_attention", "plan_tree_attention", "TreeAttentionPlan", "rejection_sample", "plan_rejection_sample",
           "RejectionSamplePlan", "kv_rollback", "choose_backend", "BACKENDS"]
