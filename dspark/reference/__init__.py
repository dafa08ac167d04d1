"""Pure-PyTorch references of the three ops: the executable spec every backend is tested against.

One module per op (`dspark.reference.tree_attention`, `.rejection_sample`, `.kv_rollback`), each
holding a function of the same name. They are written to be read, not to be fast; they compute in
float32 for half inputs and are exact in float64 when given float64 tensors.
"""
