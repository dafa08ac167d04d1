"""Confidence calibration: ECE and ROC-AUC against hand-computed values, STS recovers a known
over-confidence position by position, the engine-recorded survival labels agree with the engine's own
acceptance statistics, and `dspark calibrate` writes temperatures the drafter then applies."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.calibration import RecordingPolicy, ece, fit_sts, report, roc_auc, survival_probs
from dspark.drafters.dspark import DSparkDrafter
from dspark.engine import Engine
from dspark.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")


def test_ece_and_auc_by_hand():
    pred = torch.tensor([0.1, 0.1, 0.9, 0.9])
    assert ece(pred, torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.1)
    assert ece(pred, torch.tensor([1.0, 0.0, 1.0, 0.0]), bins=10) == pytest.approx(0.4)
    assert roc_auc(pred, torch.tensor([0.0, 0.0, 1.0, 1.0])) == 1.0
    assert roc_auc(pred, torch.tensor([1.0, 0.0, 1.0, 0.0])) == 0.5  # ties count half
    assert roc_auc(torch.tensor([0.2, 0.4, 0.3, 0.8]), torch.tensor([0.0, 1.0, 0.0, 1.0])) == 1.0
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(500, generator=gen), (torch.rand(500, generator=gen) < 0.5).float()
    pairs = (x[y == 1][:, None] > x[y == 0][None]).double().mean()  # Mann-Whitney by brute force
    assert roc_auc(x, y) == pytest.approx(float(pairs), abs=1e-9)


def test_sts_undoes_a_known_overconfidence():
    """True conditional acceptances p_k; the head reports logits 3x too sharp at position 1 and 0.5x
    at position 2: STS finds T_1 ~ 3 and then T_2 ~ 0.5 given T_1, and ECE falls."""
    gen = torch.Generator().manual_seed(1)
    n = 40_000
    p = torch.rand(n, 2, generator=gen) * 0.9 + 0.05
    accept = torch.rand(n, 2, generator=gen) < p
    survived = torch.cumprod(accept.float(), 1)
    true_logits = torch.log(p) - torch.log1p(-p)
    logits = true_logits * torch.tensor([3.0, 0.5])
    valid = torch.ones(n, 2, dtype=torch.bool)
    temps, shifts = fit_sts(logits, survived, valid)
    assert shifts == [0.0, 0.0]  # the paper's STS: temperatures only
    assert temps[0] == pytest.approx(3.0, rel=0.12) and temps[1] == pytest.approx(0.5, rel=0.12)
    rows = report(logits, survived, valid, temps)
    assert all(r["ece_after"] < 0.01 < r["ece_before"] for r in rows)
    assert rows[0]["auc_after"] == pytest.approx(rows[0]["auc_before"])  # a monotone map keeps the ranking
    assert survival_probs(logits, temps).shape == (n, 2)


def test_a_shift_fixes_a_constant_overconfidence_that_a_temperature_cannot():
    """The head adds +1 to every true logit at position 1 and -0.7 at position 2: temperatures alone keep a
    large ECE, a shift per position recovers -1 and +0.7 (given the fitted position 1) and the ECE falls
    below 1%, measured on rounds the fit never saw; the ranking is kept."""
    from dspark.calibration import SHIFTS

    gen = torch.Generator().manual_seed(2)
    n = 40_000
    p = torch.rand(n, 2, generator=gen) * 0.9 + 0.05
    survived = torch.cumprod((torch.rand(n, 2, generator=gen) < p).float(), 1)
    logits = torch.log(p) - torch.log1p(-p) + torch.tensor([1.0, -0.7])
    valid = torch.ones(n, 2, dtype=torch.bool)
    fit, test = slice(0, n // 2), slice(n // 2, n)
    temps_only, no_shift = fit_sts(logits[fit], survived[fit], valid[fit])
    temps, shifts = fit_sts(logits[fit], survived[fit], valid[fit], shift_grid=SHIFTS)
    assert shifts[0] == pytest.approx(-1.0, abs=0.15) and shifts[1] == pytest.approx(0.7, abs=0.2)
    # not the degenerate constant at the base rate that minimises ECE alone: the logits' spread is kept
    assert temps[0] == pytest.approx(1.0, rel=0.15) and temps[1] == pytest.approx(1.0, rel=0.15)
    plain = report(logits[test], survived[test], valid[test], temps_only, no_shift)
    shifted = report(logits[test], survived[test], valid[test], temps, shifts)
    assert plain[0]["ece_after"] > 0.05
    assert all(r["ece_after"] < 0.01 for r in shifted)
    assert shifted[0]["auc_after"] == pytest.approx(shifted[0]["auc_before"])


def test_recorded_labels_match_the_engine_statistics(tmp_path):
    from test_dspark_drafter import make_model, tiny_target

    target = tiny_target(tmp_path, vocab=16, hidden=32, layers=2, sharpen=4.0)
    model = make_model(target, "dspark", "markov", gamma=3, rank=8)
    policy = RecordingPolicy(3)
    engine = Engine(target, drafter=DSparkDrafter(model), policy=policy, max_batch=4, max_seq_len=64)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]] * 3
    params = [SamplingParams(max_tokens=20, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(prompts))]
    requests = engine.generate(prompts, params)
    logits, survived, valid = policy.samples()
    request = policy.request_index()
    assert request.shape == (logits.shape[0],) and sorted(set(request.tolist())) == list(range(len(prompts)))
    summary = engine.stats.summary(requests)
    assert logits.shape[0] == sum(r.stats.rounds for r in requests)  # one sample per request and round
    # emitted per round = accepted + 1, and survived_k = accepted >= k
    assert int(survived.sum()) + logits.shape[0] == sum(r.stats.emitted for r in requests)
    attempts = (valid & torch.cat([torch.ones_like(survived[:, :1]), survived[:, :-1]], 1).bool()).sum(0)
    accepted = (survived.bool() & valid).sum(0)
    assert (accepted / attempts).tolist() == pytest.approx(summary["acceptance_by_depth"])
    assert 0 < float(survived[:, 0].mean()) < 1  # both outcomes occur


def test_calibrate_cli_writes_temperatures(tmp_path):
    from dspark.cli import main

    from builders import write_tiny_llama
    from dspark.models import load_model

    write_tiny_llama(tmp_path / "target", 61, hidden=32, layers=2, max_positions=256, sharpen=4.0)
    target = load_model(str(tmp_path / "target"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(20):
            prompt = torch.randint(3, 61, (4,), generator=gen).tolist()
            f.write(json.dumps({"prompt_ids": prompt, "response_ids": torch.randint(3, 61, (12,), generator=gen).tolist()}) + "\n")
    out = tmp_path / "drafter"
    common = ["--data", str(tmp_path / "data.jsonl"), "--model", str(tmp_path / "target"), "--holdout", "4"]
    assert main(["train-drafter", "--out", str(out), "--layers", "0,1", "--gamma", "3", "--rank", "8", "--batch", "4",
                 "--anchors", "4", "--steps", "2", *common]) == 0
    assert main(["calibrate", "--drafter", str(out), "--max-tokens", "24", "--json", str(tmp_path / "r.json"),
                 *common]) == 0
    config = json.load(open(out / "config.json"))
    assert len(config["calibration"]) == 3 and all(t > 0 for t in config["calibration"])
    assert len(config["calibration_shift"]) == 3
    assert len(config["calibration_report"]["held_out_positions"]) == 3
    assert config["calibration_report"]["prompts"] == 2  # min(4, 20 // 10) held out
    assert (out / "reliability.png").stat().st_size > 1000
    drafter = DSparkDrafter.from_pretrained(str(out), target)
    assert drafter.model.config.calibration == config["calibration"]
    assert drafter.model.config.calibration_shift == config["calibration_shift"]
