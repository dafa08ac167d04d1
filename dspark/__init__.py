"""DSpark: speculative decoding with fused tree attention, lossless rejection sampling and in-place
KV rollback. The three ops live in `dspark.ops` (also as `torch.ops.dspark.*`); the engine, its
sampling parameters, drafters and verification policies are exported here too, imported on first use
so that `import dspark` for the ops alone stays light."""

import importlib

from dspark import ops
from dspark.ops import TreeAttentionPlan, kv_rollback, plan_tree_attention, rejection_sample, tree_attention

__version__ = "0.1.0"

_LAZY = {
    "Engine": "dspark.engine",
    "SamplingParams": "dspark.sampling_params",
    "Drafter": "dspark.drafters",
    "Proposal": "dspark.drafters",
    "NgramDrafter": "dspark.drafters",
    "DraftModelDrafter": "dspark.drafters",
    "DSparkDrafter": "dspark.drafters",
    "Eagle3Drafter": "dspark.drafters",
    "HybridDrafter": "dspark.drafters",
    "VerificationPolicy": "dspark.scheduler",
    "FixedLength": "dspark.scheduler",
    "ConfidenceThreshold": "dspark.scheduler",
    "PrefixScheduler": "dspark.scheduler",
    "AsyncScheduler": "dspark.scheduler",
    "load_model": "dspark.models",
    "load_tokenizer": "dspark.models",
    "TargetModel": "dspark.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dspark' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ops", "tree_attention", "plan_tree_attention", "TreeAttentionPlan", "rejection_sample", "kv_rollback",
           *_LAZY]
