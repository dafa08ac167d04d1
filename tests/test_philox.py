"""Philox4x32-10 reproduces the Random123 known-answer vectors; its uniforms lie in [0, 1)."""

import torch

from dspark.reference.philox import philox4x32, philox_uniforms

KNOWN_ANSWERS = [  # (counter, key, output) from Random123's kat_vectors
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


def test_known_answers():
    for counter, key, expected in KNOWN_ANSWERS:
        words = philox4x32([torch.tensor([c]) for c in counter], [torch.tensor([k]) for k in key])
        assert [int(w) for w in words] == expected


def test_uniforms_depend_on_seed_offset_and_local_node_only():
    qo_indptr = torch.tensor([0, 3, 7], dtype=torch.int32)
    u = philox_uniforms(torch.tensor([5, 5]), torch.tensor([2, 2]), qo_indptr)
    assert u.shape == (7, 2) and ((u >= 0) & (u < 1)).all()
    assert torch.equal(u[:3], u[3:6])  # same seed and offset, same local nodes
    assert not torch.equal(u, philox_uniforms(torch.tensor([5, 5]), torch.tensor([3, 3]), qo_indptr))
    big = philox_uniforms(torch.tensor([1]), torch.tensor([0]), torch.tensor([0, 200_000], dtype=torch.int32))
    assert abs(float(big.mean()) - 0.5) < 0.005 and abs(float(big.var()) - 1 / 12) < 0.002
