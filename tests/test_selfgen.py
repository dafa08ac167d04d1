"""Self-generated drafter data: the instruction builder is deterministic, covers the three domains and
never reproduces an evaluation prompt; the JSONL writer resumes after a kill (partial last line) and
skips prompts already answered. Generation runs on a tiny random Llama to stay fast."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.train import instructions as instr
from dspark.train import selfgen
from builders import write_tiny_llama

transformers = pytest.importorskip("transformers")


def eval_prompts_or_skip() -> list[str]:
    if not any(instr.EVAL_DIR.glob("*.jsonl")):
        pytest.skip(f"the evaluation sets are not in this checkout's surroundings ({instr.EVAL_DIR})")
    return instr.load_eval_prompts()


@pytest.fixture(scope="module")
def instructions():
    return instr.build_instructions(150, seed=3, eval_prompts=[])  # the filter has tests of its own


def test_builder_is_deterministic_and_mixed(instructions):
    again = instr.build_instructions(150, seed=3, eval_prompts=[])
    assert [it["prompt"] for it in again] == [it["prompt"] for it in instructions]
    assert [it["domain"] for it in instructions[:6]] == ["code", "math", "chat"] * 2
    assert {it["domain"] for it in instructions} == {"code", "math", "chat"}
    assert len({it["id"] for it in instructions}) == len(instructions) == 450
    other = instr.build_instructions(150, seed=4, eval_prompts=[])
    assert [it["prompt"] for it in other] != [it["prompt"] for it in instructions]


def test_no_instruction_overlaps_the_eval_sets():
    evals = eval_prompts_or_skip()
    instructions = instr.build_instructions(150, seed=3, eval_prompts=evals)
    assert len(evals) > 1500  # humaneval 164 + gsm8k 1319 + mt-bench 160 turns
    assert instr.overlaps_eval([it["prompt"] for it in instructions], evals) == set()
    normed = {instr._norm(e) for e in evals}
    assert not any(instr._norm(it["prompt"]) in normed for it in instructions)


def test_missing_eval_sets_are_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no evaluation sets"):
        instr.load_eval_prompts(tmp_path)


def test_overlap_check_catches_equal_containing_and_contained():
    evals = ["Compute the sum of 3 and 4.", "A long evaluation prompt about trains leaving two stations at noon."]
    ours = ["compute the  sum of 3 and 4.", "Please answer: Compute the sum of 3 and 4. Thanks",
            "about trains leaving two stations at noon.", "Something else entirely, long enough to matter."]
    assert instr.overlaps_eval(ours, evals) == {0, 1, 2}


def test_builder_drops_eval_prompts(monkeypatch):
    fixed = [("plain", "Explain closures to a beginner.")]
    monkeypatch.setattr(instr, "open_chat_instruction", lambda rng: fixed[0])
    monkeypatch.setattr(instr, "doc_chat_instruction", lambda para, rng: fixed[0])
    items = instr.build_instructions(5, seed=0, eval_prompts=["Explain closures to a beginner."])
    assert items == []  # zip over domains stops at the empty chat list


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_selfgen")
    write_tiny_llama(path, 64, hidden=32, layers=2, max_positions=256)
    from dspark.models import load_model

    return load_model(str(path), torch.float32)


def _items(n):
    items = [{"id": f"{i:016x}", "domain": "math", "source": "test", "prompt": str(i),
              "prompt_ids": [1, 3 + i % 50, 4 + i % 7]} for i in range(n)]
    selfgen.assign_sampling(items, 0.5, seed=0)
    return items


def test_jsonl_writer_resumes_and_truncates_partial_line(tiny_model, tmp_path):
    from dspark.engine import Engine

    out = tmp_path / "data.jsonl"
    items = _items(10)
    first = selfgen.generate_to_jsonl(Engine(tiny_model, max_batch=4, max_seq_len=64), items[:6], out, 12)
    assert first["prompts_this_run"] == 6
    with open(out, "a") as f:
        f.write('{"id": "cut off mid-wr')  # a kill during a write
    second = selfgen.generate_to_jsonl(Engine(tiny_model, max_batch=4, max_seq_len=64), items, out, 12)
    assert second["prompts_this_run"] == 4 and second["skipped_already_done"] == 6
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(it["id"] for it in items)
    for r in records:
        assert 1 <= len(r["response_ids"]) <= 12 or r["finish_reason"] == "stop"
        assert r["temperature"] in (0.0, 1.0) and r["prompt_ids"][0] == 1
    # Resumed prompts are sampled exactly as in one uninterrupted run (per-prompt seeds).
    fresh = tmp_path / "fresh.jsonl"
    selfgen.generate_to_jsonl(Engine(tiny_model, max_batch=3, max_seq_len=64), items, fresh, 12)
    by_id = {r["id"]: r["response_ids"] for r in map(json.loads, fresh.read_text().splitlines())}
    assert all(by_id[r["id"]] == r["response_ids"] for r in records)
    stats = selfgen.file_stats(out)
    assert stats["total"]["prompts"] == 10
    assert stats["total"]["response_tokens"] == sum(len(r["response_ids"]) for r in records)


def test_time_limit_stops_starting_prompts(tiny_model, tmp_path):
    from dspark.engine import Engine

    out = tmp_path / "limited.jsonl"
    run = selfgen.generate_to_jsonl(Engine(tiny_model, max_batch=2, max_seq_len=64), _items(8), out, 8,
                                    time_limit_s=0.0)
    # The limit is checked before any prompt is admitted, so a spent budget starts nothing.
    assert run["prompts_this_run"] == 0 and run["not_reached"] == 8 and not out.read_text()
