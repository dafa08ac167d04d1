"""Drafter training: the loss terms, the dataset and anchors, a few optimizer steps lower the loss on a
tiny random Llama (DSpark-Markov and EAGLE-style), and `dspark train-drafter` writes a drafter folder
that resumes and loads into the engine (greedy output unchanged)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from dspark.drafters.dspark import DSparkDrafter
from dspark.engine import Engine
from dspark.sampling_params import SamplingParams
from dspark.train.data import Sequence, anchor_positions, load_sequences
from dspark.train.loss import block_loss
from dspark.train.teacher import teacher_pass
from dspark.train.trainer import add_arguments, build, sequence_loss
from builders import threads, write_tiny_llama

transformers = pytest.importorskip("transformers")
VOCAB = 61


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threads(1):  # tiny matrices on a shared machine: threads only contend
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A sharpened tiny target, and a jsonl of its own sampled replies to random prompts."""
    from dspark.models import load_model

    root = tmp_path_factory.mktemp("train")
    write_tiny_llama(root / "target", VOCAB, hidden=32, layers=2, max_positions=256, sharpen=4.0)
    target = load_model(str(root / "target"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (int(torch.randint(2, 8, (), generator=gen)),), generator=gen).tolist()
               for _ in range(24)]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=i, ignore_eos=True) for i in range(24)]
    replies = Engine(target, max_batch=8, max_seq_len=64).generate(prompts, params)
    with open(root / "data.jsonl", "w") as f:
        for p, r in zip(prompts, replies):
            f.write(json.dumps({"prompt_ids": p, "response_ids": r.generated, "domain": "test"}) + "\n")
    return root, target


def args_for(root, *extra):
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    return ap.parse_args(["--data", str(root / "data.jsonl"), "--out", str(root / "out"), "--model",
                          str(root / "target"), "--layers", "0,1", "--gamma", "4", "--rank", "16", "--batch", "4",
                          "--anchors", "16", "--lr", "3e-3", "--holdout", "4", *extra])


def test_loss_terms():
    logits = torch.randn(3, 4, 11)
    tokens = torch.randint(0, 11, (3, 4))
    valid = torch.ones(3, 4, dtype=torch.bool)
    loss, m = block_loss(logits, torch.full((3, 4), 20.0), logits, tokens, valid)
    assert m["l1"] < 1e-6 and m["bce"] < 1e-6 and m["tau_est"] == pytest.approx(5.0)
    assert float(loss) == pytest.approx(0.1 * m["ce"], rel=1e-5)
    other = torch.randn(3, 4, 11)
    _, m2 = block_loss(logits, torch.zeros(3, 4), other, tokens, valid)
    tv = 0.5 * (torch.softmax(logits, -1) - torch.softmax(other, -1)).abs().sum(-1)
    assert m2["accept_by_pos"] == pytest.approx((1 - tv).mean(0).tolist(), rel=1e-5)
    valid[:, 2:] = False  # masked positions contribute nothing
    _, m3 = block_loss(logits, torch.zeros(3, 4), torch.where(valid[..., None], other, -other), tokens, valid)
    _, m4 = block_loss(logits[:, :2], torch.zeros(3, 2), other[:, :2], tokens[:, :2], valid[:, :2])
    assert m3["l1"] == pytest.approx(m4["l1"], rel=1e-5)


def test_dataset_and_anchors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt_ids": [1, 2, 3], "response_ids": [4, 5, 6, 7]}\n{"input_ids": [1, 2]}\n'
                    '{"input_ids": [9, 8, 7, 6]}\n')
    seqs = load_sequences(str(path), 10, max_len=6)
    assert [s.ids.tolist() for s in seqs] == [[1, 2, 3, 4, 5, 6], [9, 8, 7, 6]]
    assert [s.prompt_len for s in seqs] == [3, 0]
    gen = torch.Generator().manual_seed(0)
    assert anchor_positions(seqs[0], 99, gen).tolist() == [3, 4]  # from the response, with a target after
    assert anchor_positions(seqs[1], 99, gen).tolist() == [1, 2]
    assert len(anchor_positions(Sequence(torch.arange(50), 5), 7, gen)) == 7
    path.write_text('{"prompt_ids": [1, 2, 3], "response_ids": [4, 10]}\n')
    with pytest.raises(ValueError, match="token ids"):
        load_sequences(str(path), 10)


@pytest.mark.parametrize("variant", [[], ["--eagle"], ["--head", "rnn"], ["subset"]])
def test_a_few_steps_lower_the_loss(setup, variant):
    root, target = setup
    args = args_for(root, *([] if variant == ["subset"] else variant))
    subset = None
    if variant == ["subset"]:  # the data's 30 most frequent reply tokens, half the vocabulary
        from dspark.train.data import frequent_tokens

        subset = torch.tensor(frequent_tokens(load_sequences(args.data, VOCAB), 30)[0])
    torch.manual_seed(0)
    model = build(args, target).attach(target).train()
    seqs = load_sequences(args.data, VOCAB)[:4]
    teachers = teacher_pass(target, [s.ids for s in seqs], tuple(model.config.target_layers))
    anchors = [anchor_positions(s, 16, torch.Generator().manual_seed(i)) for i, s in enumerate(seqs)]

    def batch_loss(term=None):
        out = [sequence_loss(model, t, s, a, 4.0, subset) for s, t, a in zip(seqs, teachers, anchors)]
        return torch.stack([loss for loss, _ in out]).mean() if term is None else sum(m[term] for _, m in out)

    # Over a subset, L1 keeps the target's mass outside it as a floor: the CE over in-subset targets
    # is the part that must fall.
    term = "ce" if subset is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(batch_loss(term))
    for _ in range(8):
        optimizer.zero_grad()
        batch_loss().backward()
        optimizer.step()
    with torch.no_grad():
        assert float(batch_loss(term)) < (0.95 if subset is not None else 0.9) * before


def test_cli_trains_resumes_and_loads(setup):
    from dspark.cli import main

    root, target = setup
    base = ["train-drafter", "--data", str(root / "data.jsonl"), "--out", str(root / "cli"), "--model",
            str(root / "target"), "--layers", "0,1", "--gamma", "4", "--rank", "16", "--batch", "4",
            "--anchors", "8", "--holdout", "4", "--log-every", "1", "--save-every", "2"]
    assert main(base + ["--steps", "3"]) == 0
    assert main(base + ["--steps", "5", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in open(root / "cli" / "train_log.jsonl")]
    assert steps == [1, 2, 3, 4, 5]  # resumed at step 3, not from scratch
    config = json.load(open(root / "cli" / "config.json"))
    assert config["training"]["sequences"] == 22 and config["training"]["holdout_sequences"] == 2 and config["training"]["holdout"]["tau_est"] > 1
    drafter = DSparkDrafter.from_pretrained(str(root / "cli"), target)
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = [r.generated for r in Engine(target, max_seq_len=64).generate(prompts, greedy)]
    spec = [r.generated for r in Engine(target, drafter=drafter, max_batch=2, max_seq_len=64).generate(prompts, greedy)]
    assert spec == plain
    from dspark.cli import make_drafter  # what `dspark generate --drafter dspark:DIR` loads

    loaded = make_drafter(f"dspark:{root / 'cli'}", target, 3, torch.float32, "cpu")
    assert isinstance(loaded, DSparkDrafter) and loaded.num_draft == 3


def test_feature_cache_matches_the_teacher_and_resumes(setup, tmp_path):
    from dspark.train.feature_cache import FeatureCache

    root, target = setup
    seqs = load_sequences(str(root / "data.jsonl"), VOCAB)[:6]
    layers = (0, 1)
    partial = FeatureCache(str(tmp_path / "fc"), seqs, target, layers)
    partial.build(batch=4)
    cache = FeatureCache(str(tmp_path / "fc"), seqs, target, layers)  # reopened: already done
    assert cache.complete and cache.done == 6
    resumed = FeatureCache(str(tmp_path / "fc2"), seqs, target, layers)
    resumed.done = 3  # as if stopped after three sequences: build() must finish the rest only
    resumed.build(batch=2)
    fresh = teacher_pass(target, [s.ids for s in seqs], layers)
    for i, s in enumerate(seqs):
        for c in (cache, resumed) if i >= 3 else (cache,):
            got = c[i]
            assert torch.allclose(got.features, fresh[i].features, rtol=2e-3, atol=2e-3)
            pos = torch.arange(s.ids.shape[0] - 1)
            assert torch.allclose(got.logits_at(pos), fresh[i].logits_at(pos), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="other sequences"):
        FeatureCache(str(tmp_path / "fc"), seqs[:5], target, layers)
    with pytest.raises(RuntimeError, match="build"):
        FeatureCache(str(tmp_path / "fc3"), seqs, target, layers)[0]


def test_cli_with_feature_cache(setup):
    from dspark.cli import main

    root, _ = setup
    base = ["train-drafter", "--data", str(root / "data.jsonl"), "--out", str(root / "cached"), "--model",
            str(root / "target"), "--layers", "0,1", "--gamma", "4", "--rank", "16", "--batch", "4",
            "--anchors", "8", "--holdout", "4", "--feature-cache", str(root / "fc-cli"), "--steps", "3"]
    assert main(base) == 0
    assert json.load(open(root / "fc-cli" / "index.json"))["done"] == 22
    assert json.load(open(root / "cached" / "config.json"))["training"]["holdout"]["tau_est"] > 1


def test_cli_caps_the_data_and_trains_qk_norm_layers(setup):
    from dspark.cli import main

    root, _ = setup
    assert main(["train-drafter", "--data", str(root / "data.jsonl"), "--out", str(root / "capped"), "--model",
                 str(root / "target"), "--layers", "0,1", "--gamma", "4", "--rank", "16", "--batch", "4",
                 "--anchors", "8", "--holdout", "4", "--feature-cache", str(root / "fc-capped"), "--steps", "2",
                 "--sequences", "12", "--qk-norm", "--head", "gated"]) == 0
    assert json.load(open(root / "fc-capped" / "index.json"))["done"] == 11  # 12 minus a hold-out of 12 // 10
    config = json.load(open(root / "capped" / "config.json"))
    assert config["qk_norm"] and config["head"] == "gated" and config["training"]["sequences"] == 11


def test_draft_vocab_cli(setup):
    from dspark.cli import main
    from dspark.train.data import frequent_tokens

    root, target = setup
    seqs = load_sequences(str(root / "data.jsonl"), VOCAB)
    ids, covered = frequent_tokens(seqs, 10, always=(0,))
    counts = torch.bincount(torch.cat([s.ids[s.prompt_len:] for s in seqs]), minlength=VOCAB)
    top = sorted(range(VOCAB), key=lambda t: (-int(counts[t]), t))[:10]
    assert ids == sorted(set(top) | {0}) and covered == pytest.approx(float(counts[top].sum() / counts.sum()))
    out = root / "vocab-drafter"
    assert main(["train-drafter", "--data", str(root / "data.jsonl"), "--out", str(out), "--model", str(root / "target"),
                 "--layers", "0,1", "--gamma", "3", "--rank", "8", "--batch", "4", "--anchors", "4", "--steps", "1",
                 "--holdout", "4"]) == 0
    assert main(["draft-vocab", "--drafter", str(out), "--data", str(root / "data.jsonl"), "--size", "20",
                 "--model", str(root / "target")]) == 0
    drafter = DSparkDrafter.from_pretrained(str(out), target)
    assert drafter.vocab_ids is not None and 20 <= drafter.vocab_ids.numel() <= 21
    assert DSparkDrafter.from_pretrained(str(out), target, use_draft_vocab=False).vocab_ids is None


def test_auto_drafter_is_the_shipped_one_for_the_default_target(setup, tmp_path, monkeypatch):
    import shutil

    from dspark.cli import generate as cli
    from dspark.drafters import HybridDrafter, NgramDrafter

    root, target = setup
    monkeypatch.setattr(cli, "SHIPPED_DRAFTERS", str(tmp_path))
    fallback = cli.make_drafter("auto", target, None, torch.float32, "cpu", model_arg=None)
    assert isinstance(fallback, NgramDrafter) and fallback.num_draft == 4  # nothing shipped here
    shutil.copytree(root / "cli", tmp_path / "smollm2-135m-instruct")  # the drafter test_cli_trains... wrote
    shipped = cli.make_drafter("auto", target, None, torch.float32, "cpu", model_arg=None)
    assert isinstance(shipped, HybridDrafter) and isinstance(shipped.dspark, DSparkDrafter)
    assert shipped.num_draft == 4  # its trained gamma
    other = cli.make_drafter("auto", target, 3, torch.float32, "cpu", model_arg="some/other/model.gguf")
    assert isinstance(other, NgramDrafter) and other.num_draft == 3


@pytest.mark.parametrize("order", [[1, 4, 6, 9], [9, 1, 6, 4]])
def test_loss_over_a_draft_vocabulary_equals_the_masked_full_loss(order):
    gen = torch.Generator().manual_seed(5)
    subset = torch.tensor(order)  # column j of the draft logits is token order[j], in any order
    draft = torch.randn(3, 4, 4, generator=gen)
    target = torch.randn(3, 4, 11, generator=gen)
    tokens = torch.tensor([[1, 4, 6, 9], [9, 6, 4, 1], [4, 4, 2, 9]])  # 2: outside the subset
    valid = torch.ones(3, 4, dtype=torch.bool)
    conf = torch.randn(3, 4, generator=gen)
    full = torch.full((3, 4, 11), float("-inf"))
    full[..., subset] = draft  # the same drafter with zero mass outside the subset
    _, sub = block_loss(draft, conf, target, tokens, valid, vocab_ids=subset)
    _, ref = block_loss(full, conf, target, tokens, valid)
    assert sub["l1"] == pytest.approx(ref["l1"], rel=1e-5) and sub["bce"] == pytest.approx(ref["bce"], rel=1e-5)
    assert sub["accept_by_pos"] == pytest.approx(ref["accept_by_pos"], rel=1e-5)
    inside = tokens != 2
    ce = -torch.log_softmax(draft, -1).gather(-1, (tokens[..., None] == subset).float().argmax(-1, keepdim=True))[..., 0]
    w = torch.exp(-torch.arange(4) / 4.0)[None].expand(3, 4) * inside
    assert sub["ce"] == pytest.approx(float((ce * w).sum() / w.sum()), rel=1e-5)


def test_cli_trains_over_a_draft_vocabulary(setup):
    from dspark.cli import main

    root, target = setup
    out = root / "vocab-trained"
    assert main(["train-drafter", "--data", str(root / "data.jsonl"), "--out", str(out), "--model", str(root / "target"),
                 "--layers", "0,1", "--gamma", "3", "--rank", "8", "--batch", "4", "--anchors", "8", "--steps", "3",
                 "--holdout", "4", "--draft-vocab", "20"]) == 0
    vocab = json.load(open(out / "draft_vocab.json"))
    assert 20 <= vocab["size"] <= 21 and 0 < vocab["coverage_of_data"] <= 1
    assert json.load(open(out / "config.json"))["training"]["holdout"]["tau_est"] > 1
    drafter = DSparkDrafter.from_pretrained(str(out), target)
    assert drafter.vocab_ids.tolist() == vocab["token_ids"]
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = [r.generated for r in Engine(target, max_seq_len=64).generate(prompts, greedy)]
    spec = Engine(target, drafter=drafter, max_batch=2, max_seq_len=64).generate(prompts, greedy)
    assert [r.generated for r in spec] == plain


def test_teacher_logits_repeat_the_target_head_per_position(setup):
    """logits_at runs the head once per distinct position (blocks overlap), as a dense GEMM: each row is
    the target's own logits of that position, repeats and order kept."""
    root, target = setup
    seq = load_sequences(str(root / "data.jsonl"), VOCAB)[0]
    teacher = teacher_pass(target, [seq.ids], (0, 1))[0]
    positions = torch.tensor([[5, 3, 5], [0, 3, 9]])
    got = teacher.logits_at(positions)
    assert got.shape == (2, 3, VOCAB) and got.dtype == torch.float32
    reference = target.logits(teacher._hidden[positions.flatten()]).view(2, 3, VOCAB)
    assert torch.allclose(got, reference, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = teacher.logits_at(positions)
    assert low.dtype == torch.float32 and not torch.equal(low, got)  # the bf16 product, returned in fp32
    assert torch.allclose(low, reference, rtol=5e-2, atol=5e-2)


def test_frozen_head_rows_follow_the_vocabulary_and_autocast(setup):
    """DSparkModel keeps its frozen head's rows gathered and cast once; another vocabulary tensor, another
    dtype or re-attached weights never see stale rows."""
    root, target = setup
    model = build(args_for(root), target).attach(target)
    head = target.shared_weights()[1]
    h = torch.randn(5, head.shape[1], generator=torch.Generator().manual_seed(2))
    first, second = torch.tensor([1, 7, 30]), torch.tensor([2, 3, 4, 50])
    for ids in (first, second, first.clone(), None):
        rows = head if ids is None else head[ids]
        assert torch.allclose(model.lm_logits(h, ids), h @ rows.T, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.lm_logits(h, first)
    assert torch.equal(low, (h.bfloat16() @ head[first].bfloat16().T).float())
    other = head.flip(0).contiguous()
    model.attach_weights(target.shared_weights()[0], other)
    assert torch.allclose(model.lm_logits(h, first), h @ other[first].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_flag_trains_in_either_dtype(setup, precision):
    """--precision bf16 runs the products under bf16 autocast (parameters stay fp32); fp32 turns it off.
    A few steps lower the loss either way."""
    from dspark.train.trainer import autocast, train_step

    root, target = setup
    args = args_for(root, "--precision", precision)
    with autocast(args, "cpu"):
        assert torch.is_autocast_enabled("cpu") == (precision == "bf16")
    torch.manual_seed(0)
    model = build(args, target).attach(target).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seqs = load_sequences(str(root / "data.jsonl"), VOCAB)[:4]
    batch = list(enumerate(seqs))
    losses = []
    for step in range(12):
        optimizer.zero_grad()
        losses.append(train_step(args, model, target, batch, torch.Generator().manual_seed(step))["loss"])
        optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.parametrize("subset", [None, torch.tensor([9, 1, 6, 4])])
def test_loss_from_target_probabilities_equals_the_loss_from_logits(subset):
    """The trainer hands block_loss the teacher's probabilities (restricted to the draft vocabulary, in any
    order of it): the same loss and metrics as from the full logits."""
    gen = torch.Generator().manual_seed(6)
    width = 11 if subset is None else subset.numel()
    draft = torch.randn(3, 4, width, generator=gen, requires_grad=True)
    target = torch.randn(3, 4, 11, generator=gen)
    tokens = torch.tensor([[1, 4, 6, 9], [9, 6, 4, 1], [4, 4, 2, 10]])
    valid = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]])
    conf = torch.randn(3, 4, generator=gen)
    probs = torch.softmax(target, -1) if subset is None else torch.softmax(target, -1)[..., subset]
    loss_a, a = block_loss(draft, conf, target, tokens, valid, vocab_ids=subset)
    loss_b, b = block_loss(draft, conf, None, tokens, valid, vocab_ids=subset, target_probs=probs)
    assert float(loss_a.detach()) == pytest.approx(float(loss_b.detach()), rel=1e-6)
    assert a.pop("accept_by_pos") == pytest.approx(b.pop("accept_by_pos"), rel=1e-6)
    assert a == pytest.approx(b, rel=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        block_loss(draft, conf, target, tokens, valid, target_probs=torch.softmax(target, -1))
    with pytest.raises(ValueError, match="do not match"):
        block_loss(draft, conf, None, tokens, valid, vocab_ids=subset, target_probs=torch.rand(3, 4, width + 1))


def test_teacher_probabilities_over_a_draft_vocabulary(setup):
    root, target = setup
    seq = load_sequences(str(root / "data.jsonl"), VOCAB)[1]
    teacher = teacher_pass(target, [seq.ids], (0, 1))[0]
    positions = torch.tensor([[4, 2, 4, 7], [7, 0, 1, 2]])
    subset = torch.tensor([3, 50, 7, 11, 40])
    full = torch.softmax(teacher.logits_at(positions), -1)
    torch.testing.assert_close(teacher.probs_at(positions), full)
    torch.testing.assert_close(teacher.probs_at(positions, subset), full[..., subset])
