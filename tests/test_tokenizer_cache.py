"""load_tokenizer's cache is written whole: saved into a fresh folder beside its place, then renamed there,
so that a process starting meanwhile never reads half a tokenizer; a second writer leaves the first one's."""

from __future__ import annotations

import pathlib

from dspark.models.loading import _save_whole


class FakeTokenizer:
    def __init__(self, label: str):
        self.label = label

    def save_pretrained(self, folder: str) -> None:
        path = pathlib.Path(folder)
        (path / "tokenizer_config.json").write_text(self.label)
        (path / "tokenizer.json").write_text(self.label)


def test_the_cache_appears_whole_and_a_second_writer_leaves_it(tmp_path):
    cached = tmp_path / "tokenizers" / "model-1-2"
    _save_whole(FakeTokenizer("first"), cached)
    assert sorted(p.name for p in cached.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    _save_whole(FakeTokenizer("second"), cached)  # another process got there first: its cache stays
    assert (cached / "tokenizer.json").read_text() == "first"
    assert [p.name for p in cached.parent.iterdir()] == ["model-1-2"]  # no partial folder left behind


def test_a_read_only_place_only_costs_the_save(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    _save_whole(FakeTokenizer("x"), blocked / "tokenizers" / "model")  # no exception
    assert blocked.read_text() == "not a folder"
