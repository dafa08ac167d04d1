"""dspark.models.gguf_file reads what the gguf package writes: the same metadata values and tensor bytes as
the gguf package's own reader, arrays stepped over; dense weights are the gguf package's dequantisation
exactly; malformed files are refused with the path named."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

from dspark.models.gguf_file import read_gguf  # noqa: E402
from dspark.models.loading import _dense  # noqa: E402

Q = gguf.GGMLQuantizationType


def write_file(path, alignment: int | None = None) -> None:
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint32("test.u32", 4_000_000_000)
    writer.add_int32("test.i32", -7)
    writer.add_uint64("test.u64", 2**40 + 3)
    writer.add_int64("test.i64", -(2**40))
    writer.add_float32("test.f32", 0.125)
    writer.add_float64("test.f64", -1e-300)
    writer.add_bool("test.bool", True)
    writer.add_uint8("test.u8", 200)
    writer.add_int16("test.i16", -300)
    writer.add_string("test.text", "héllo ✓")
    writer.add_array("test.words", ["a", "", "long " * 40, "✓"])
    writer.add_array("test.ints", [3, 1, 4, 1, 5])
    writer.add_array("test.floats", [0.5, -2.0])
    writer.add_uint32("test.after_arrays", 11)  # read from the right offset only if the arrays were skipped right
    dense = rng.standard_normal((6, 64)).astype(np.float32)
    writer.add_tensor("f32.weight", dense)
    writer.add_tensor("f16.weight", rng.standard_normal((3, 32)).astype(np.float16))
    writer.add_tensor("vector.weight", rng.standard_normal(17).astype(np.float32))
    writer.add_tensor("q8_0.weight", quantize(dense, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("q4_0.weight", quantize(dense, Q.Q4_0), raw_dtype=Q.Q4_0)
    q4_1 = rng.integers(0, 256, (5, 2 * 20), dtype=np.uint8)
    q4_1.view(np.float16)[:, [0, 1, 10, 11]] = rng.standard_normal((5, 4)).astype(np.float16)  # finite scales
    writer.add_tensor("q4_1.weight", q4_1, raw_dtype=Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_what_the_gguf_package_reads(tmp_path, alignment):
    path = tmp_path / "model.gguf"
    write_file(path, alignment)
    metadata, tensors = read_gguf(str(path))
    theirs = gguf.GGUFReader(str(path))
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue  # the header's counts, not metadata
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            assert metadata[key] is None, key
        elif kind == gguf.GGUFValueType.STRING:
            assert metadata[key] == bytes(field.parts[field.data[0]]).decode(), key
        else:
            assert metadata[key] == field.parts[field.data[0]].tolist()[0], key
    assert metadata["test.after_arrays"] == 11 and metadata["test.text"] == "héllo ✓"
    assert [t.name for t in tensors] == [t.name for t in theirs.tensors]
    for ours, their in zip(tensors, theirs.tensors):
        assert ours.shape == tuple(int(d) for d in their.shape), ours.name
        assert ours.type_id == int(their.tensor_type), ours.name
        assert bytes(ours.data) == np.asarray(their.data).tobytes(), ours.name


def test_dense_weights_are_the_gguf_packages_dequantisation(tmp_path):
    path = tmp_path / "model.gguf"
    write_file(path)
    _, tensors = read_gguf(str(path))
    for ours, their in zip(tensors, gguf.GGUFReader(str(path)).tensors):
        expected = np.array(dequantize(their.data, their.tensor_type), dtype=np.float32)
        got = _dense(ours)
        assert list(got.shape) == [int(d) for d in reversed(their.shape)], ours.name
        assert torch.equal(got, torch.from_numpy(expected).reshape(got.shape)), ours.name


def test_malformed_files_are_refused_with_the_path(tmp_path):
    path = tmp_path / "model.gguf"
    write_file(path)
    good = path.read_bytes()
    cases = {
        "magic": b"GGUX" + good[4:],
        "version": good[:4] + (1).to_bytes(4, "little") + good[8:],
        "truncated_header": good[:200],
        "truncated_data": good[:-100],
    }
    messages = {"magic": "not a GGUF file", "version": "version 1", "truncated_header": "truncated",
                "truncated_data": "does not fit the file"}
    for case, data in cases.items():
        bad = tmp_path / f"{case}.gguf"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=messages[case]) as info:
            read_gguf(str(bad))
        assert str(bad) in str(info.value), case


def test_a_file_cut_anywhere_is_a_value_error(tmp_path):
    path = tmp_path / "model.gguf"
    write_file(path)
    good = path.read_bytes()
    bad = tmp_path / "cut.gguf"
    for cut in range(0, len(good) - 64, 11):  # the last bytes may be the final tensor's alignment padding
        bad.write_bytes(good[:cut])
        with pytest.raises(ValueError):
            read_gguf(str(bad))


# Hand-built files, for what the gguf package's writer will not write.
def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _value(key: bytes, kind: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", kind) + payload


def _nested_array(depth: int) -> bytes:
    """An array of one array of ... of two u32 (type 9 = array, 4 = u32)."""
    if depth == 0:
        return struct.pack("<IQ", 4, 2) + struct.pack("<II", 7, 8)
    return struct.pack("<IQ", 9, 1) + _nested_array(depth - 1)


def _file(values: list[bytes], tensors: list[tuple[bytes, tuple, int]], alignment: int = 32) -> bytes:
    """GGUF v3 with f32 (type 0) or other tensors of `tensors` (name, dims, type), each of 64 zero bytes."""
    infos = b"".join(_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", kind, 64 * i) for i, (name, dims, kind) in enumerate(tensors))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(values)) + b"".join(values) + infos
    return head + bytes(-len(head) % alignment) + bytes(64 * len(tensors))


def _read(tmp_path, data: bytes):
    path = tmp_path / "hand.gguf"
    path.write_bytes(data)
    return read_gguf(str(path))


def test_hand_built_files_read_right(tmp_path):
    values = [_value(b"a.nested", 9, _nested_array(3)), _value(b"a.after", 4, struct.pack("<I", 5)),
              _value(b"general.alignment", 4, struct.pack("<I", 64))]
    metadata, tensors = _read(tmp_path, _file(values, [(b"w", (4, 4), 0), (b"v", (16,), 0)], alignment=64))
    assert metadata == {"a.nested": None, "a.after": 5, "general.alignment": 64}
    assert [(t.name, t.shape, t.data.size) for t in tensors] == [("w", (4, 4), 64), ("v", (16,), 64)]


@pytest.mark.parametrize("case, values, tensors, match", [
    ("alignment 0", [_value(b"general.alignment", 4, struct.pack("<I", 0))], [], "power of two"),
    ("alignment 48", [_value(b"general.alignment", 4, struct.pack("<I", 48))], [], "power of two"),
    ("negative alignment", [_value(b"general.alignment", 5, struct.pack("<i", -32))], [], "power of two"),
    ("float alignment", [_value(b"general.alignment", 6, struct.pack("<f", 0.5))], [], "power of two"),
    ("deep nesting", [_value(b"a.deep", 9, _nested_array(40))], [], "nested deeper"),
    ("bad utf-8 key", [_value(b"a.\xff", 4, struct.pack("<I", 1))], [], "not UTF-8"),
    ("twice the same tensor", [], [(b"w", (16,), 0), (b"w", (16,), 0)], "appears twice"),
    ("five dimensions", [], [(b"w", (1, 1, 1, 2, 8), 0)], "5 dimensions"),
    ("no dimension", [], [(b"w", (), 0)], "0 dimensions"),
    ("an empty dimension", [], [(b"w", (16, 0), 0)], "empty dimension"),
    ("a row of half a block", [], [(b"w", (16, 2), 8)], "does not fit"),  # Q8_0 blocks are 32 wide
    ("a shape past 2**64 elements", [], [(b"w", (2**62 + 1, 4), 0)], "does not fit"),
])
def test_malformed_hand_built_files_are_refused(tmp_path, case, values, tensors, match):
    with pytest.raises(ValueError, match=match):
        _read(tmp_path, _file(values, tensors))
