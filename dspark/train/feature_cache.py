"""The frozen target's outputs for every training sequence, computed once and kept on disk.

With the target frozen, its captured layer features and final hidden states are the same every
epoch; on a CPU the teacher prefill is most of a training step, so past the first epoch it is pure
waste. The cache is one fp16 memory-mapped array [total tokens, captured width + hidden] plus
index.json (offsets, layers, what data it was built from). Building is resumable: index.json
records how many sequences are done after every batch.

fp16 rather than bf16: three more mantissa bits, and SmolLM2's largest residual value (~2.5e4, the
first token's massive activation) fits; a value beyond fp16's range is an error, not a silent inf.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from dspark.train.data import Sequence
from dspark.train.teacher import TeacherOutput, teacher_pass

FP16_MAX = 65504.0


def _signature(sequences: list[Sequence], layers: tuple[int, ...], hidden_size: int, width: int) -> dict:
    lengths = [int(s.ids.shape[0]) for s in sequences]
    checksum = int(sum((i + 1) * int(s.ids.sum()) for i, s in enumerate(sequences)) % (1 << 61))
    return {"layers": list(layers), "hidden_size": hidden_size, "width": width, "lengths": lengths,
            "checksum": checksum}


class FeatureCache:
    """Per-sequence TeacherOutput views over the memory-mapped array, in the order of `sequences`."""

    def __init__(self, path: str, sequences: list[Sequence], target, layers: tuple[int, ...]):
        self.path, self.sequences, self.target, self.layers = path, sequences, target, tuple(layers)
        c = target.config
        self.hidden_size = c.hidden_size
        self.width = len(layers) * c.hidden_size
        self.signature = _signature(sequences, self.layers, c.hidden_size, self.width)
        lengths = self.signature["lengths"]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.index_path = os.path.join(path, "index.json")
        self.array_path = os.path.join(path, "features.f16")
        self.done = self._load_progress()
        self.array = None

    def _load_progress(self) -> int:
        if not os.path.exists(self.index_path):
            return 0
        with open(self.index_path) as f:
            index = json.load(f)
        if index.get("signature") != self.signature:
            raise ValueError(f"{self.path} was built for other sequences or layers; use a new --feature-cache folder")
        return int(index["done"])

    def _write_progress(self) -> None:
        tmp = self.index_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"done": self.done, "signature": self.signature}, f)
        os.replace(tmp, self.index_path)

    def _open(self, mode: str) -> np.memmap:
        shape = (int(self.offsets[-1]), self.width + self.hidden_size)
        return np.memmap(self.array_path, dtype=np.float16, mode=mode, shape=shape)

    @property
    def complete(self) -> bool:
        return self.done == len(self.sequences)

    @torch.no_grad()
    def build(self, batch: int = 4, progress=None) -> None:
        """Run the teacher over the sequences not yet cached, `batch` at a time."""
        os.makedirs(self.path, exist_ok=True)
        array = self._open("r+" if os.path.exists(self.array_path) else "w+")
        while self.done < len(self.sequences):
            chunk = self.sequences[self.done: self.done + batch]
            outputs = teacher_pass(self.target, [s.ids.to(self.target.device) for s in chunk], self.layers)
            for i, out in enumerate(outputs):
                row = torch.cat([out.features, out._hidden], dim=-1).float()
                peak = float(row.abs().max())
                if not peak <= FP16_MAX:
                    raise ValueError(f"sequence {self.done + i}: a target activation ({peak:g}) exceeds fp16's range")
                start = self.offsets[self.done + i]
                array[start: start + row.shape[0]] = row.cpu().numpy().astype(np.float16)
            array.flush()
            self.done += len(chunk)
            self._write_progress()
            if progress is not None:
                progress.update(len(chunk))
        del array

    def __getitem__(self, i: int) -> TeacherOutput:
        if not self.complete:
            raise RuntimeError(f"{self.path} holds {self.done} of {len(self.sequences)} sequences; build() it first")
        if self.array is None:
            self.array = self._open("r")
        rows = torch.from_numpy(np.array(self.array[self.offsets[i]: self.offsets[i + 1]], dtype=np.float32))
        device = self.target.device
        return TeacherOutput(rows[:, : self.width].to(device), rows[:, self.width:].to(device, self.target.dtype),
                             None, self.target)
