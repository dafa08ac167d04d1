"""`dspark calibrate`: fit a drafter's confidence temperatures (Sequential Temperature Scaling) on its
held-out prompts, report ECE and ROC-AUC before and after, and store the temperatures in its config."""

from __future__ import annotations

import json
import os

import torch

from dspark.calibration import SHIFTS, collect, fit_sts, held_out_report, heldout_prompts, reliability_diagram, report
from dspark.drafters.dspark import DSparkDrafter
from dspark.models import load_model
from dspark.models.dtypes import default_dtype


def add_arguments(ap) -> None:
    ap.add_argument("--drafter", required=True, help="drafter folder (written by train-drafter); gets the temperatures")
    ap.add_argument("--data", required=True, help="the training jsonl: its held-out tail gives the prompts")
    ap.add_argument("--holdout", type=int, default=32, help="as given to train-drafter (the same tail is held out)")
    ap.add_argument("--model", default=None, help="target (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--png", default=None, help="reliability diagram (default: DRAFTER/reliability.png)")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--no-shift", action="store_true",
                    help="temperatures only (the paper's STS); by default each position also gets a logit shift")
    ap.add_argument("--samples", default=None,
                    help="save the recorded rounds (confidence logits, survival, request) here, to fit again offline")
    ap.add_argument("--dry-run", action="store_true", help="report only; leave the drafter's temperatures as they are")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_model(args.model, default_dtype("cpu") if not torch.cuda.is_available() else torch.bfloat16,
                        "cuda" if torch.cuda.is_available() else "cpu")
    drafter = DSparkDrafter.from_pretrained(args.drafter, target)
    drafter.model.config.calibration = drafter.model.config.calibration_shift = None  # raw confidences
    prompts = heldout_prompts(args.data, target.config.vocab_size, args.holdout)
    logits, survived, valid, request = collect(target, drafter, prompts, args.max_tokens, args.temperature,
                                               args.batch)
    if args.samples:
        torch.save({"logits": logits, "survived": survived, "valid": valid, "request": request}, args.samples)
    shift_grid = (0.0,) if args.no_shift else SHIFTS
    temps, shifts = fit_sts(logits, survived, valid, shift_grid=shift_grid)
    rows = report(logits, survived, valid, temps, shifts)
    held_out = held_out_report(logits, survived, valid, request, shift_grid) if len(prompts) > 1 else None
    result = {"temperatures": temps, "shifts": shifts, "rounds": int(logits.shape[0]), "prompts": len(prompts),
              "temperature": args.temperature, "max_tokens": args.max_tokens, "data": os.path.abspath(args.data),
              "positions": rows, "held_out_positions": held_out}
    print(f"{result['rounds']} rounds over {len(prompts)} held-out prompts, temperature {args.temperature:g}")
    print("pos  samples  survival   T_k     b_k    ECE before  ECE after  (fit on half, other half)   AUC before  AUC after")
    for i, r in enumerate(rows):
        honest = f"{held_out[i]['ece_after']:>9.4f}" if held_out else "      n/a"
        print(f"{r['position']:>3}  {r['samples']:>7}  {r['survival_rate']:>8.3f}  {r['temperature']:>6.3f}  "
              f"{r['shift']:>5.2f}  {r['ece_before']:>10.4f}  {r['ece_after']:>9.4f}  {honest:>26}   "
              f"{r['auc_before']:>9.3f}  {r['auc_after']:>9.3f}")
    png = args.png or os.path.join(args.drafter, "reliability.png")
    reliability_diagram(png, logits, survived, valid, temps,
                        f"{os.path.basename(os.path.normpath(args.drafter))}: survival calibration (T={args.temperature:g})",
                        shifts=shifts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if not args.dry_run:
        config_path = os.path.join(args.drafter, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["calibration"], config["calibration_shift"], config["calibration_report"] = temps, shifts, result
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
    return 0
