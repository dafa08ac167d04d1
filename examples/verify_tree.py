"""Verify one draft tree through the three ops and print what was accepted.

A toy "target" (random K/V cache, random projections) verifies a 7-node draft tree for two requests:
tree_attention over the flattened round, rejection_sample on the resulting logits, then kv_rollback
compacts each cache to its accepted path.
"""

import torch

from dspark import ops

torch.manual_seed(0)
VOCAB, HEADS, KV_HEADS, DIM = 50, 8, 2, 64
parents_one = [-1, 0, 0, 1, 1, 2, 3]  # anchor with two children, depth 3
committed = torch.tensor([12, 5], dtype=torch.int32)
qo_indptr = torch.tensor([0, 7, 14], dtype=torch.int32)
parents = torch.tensor(parents_one * 2, dtype=torch.int32)
draft_tokens = torch.randint(0, VOCAB, (14,))

k_cache = torch.randn(2, 32, KV_HEADS, DIM)
v_cache = torch.randn(2, 32, KV_HEADS, DIM)
q = torch.randn(14, HEADS, DIM)
hidden = ops.tree_attention(q, k_cache, v_cache, qo_indptr, committed, parents)
logits = hidden.flatten(1) @ torch.randn(HEADS * DIM, VOCAB)
for start in (0, 7):  # make the target agree with the drafts along the branch 0 -> 1 -> 3 -> 6
    for node in (1, 3, 6):
        logits[start + parents_one[node], draft_tokens[start + node]] += 100.0

nodes, count, tokens = ops.rejection_sample(logits, draft_tokens, qo_indptr, parents,
                                            temperature=torch.tensor([0.0, 0.8]), seed=torch.tensor([1, 2]))
lengths = committed.clone()
ops.kv_rollback(k_cache, v_cache, lengths, nodes, count)
for r in range(2):
    m = int(count[r])
    mode = "greedy" if r == 0 else "sampled (T=0.8)"
    print(f"request {r} [{mode}]: drafts {draft_tokens[7 * r: 7 * r + 7].tolist()} parents {parents_one}")
    print(f"  accepted path {nodes[r, :m].tolist()} -> emitted {tokens[r, :m].tolist()}; "
          f"cache length {int(committed[r])} -> {int(lengths[r])}")
print(f"backend: {ops.choose_backend(None, q.device)}")
