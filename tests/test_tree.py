"""dspark.tree: depths, RoPE positions and ancestor masks from the flattened parents layout."""

import torch

from dspark import tree


def test_depths_children_and_mask_of_a_tree():
    parents = [-1, 0, 0, 1, 1, 2, 3]
    assert tree.depths(parents) == [0, 1, 1, 2, 2, 2, 3]
    assert tree.children(parents) == [[1, 2], [3, 4], [5], [6], [], [], []]
    mask = tree.ancestor_mask(parents)
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert mask[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert not mask[4, 3]  # siblings never see each other


def test_positions_of_a_ragged_round():
    qo_indptr = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    parents = torch.tensor([-1, 0, 0, -1, -1, 0, 1, 1], dtype=torch.int32)
    seqlens = torch.tensor([10, 0, 5], dtype=torch.int32)
    assert tree.positions(parents, qo_indptr, seqlens).tolist() == [10, 11, 11, 0, 5, 6, 7, 7]
    assert tree.positions(None, qo_indptr, seqlens).tolist() == [10, 11, 12, 0, 5, 6, 7, 8]
