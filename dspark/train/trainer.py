"""`dspark train-drafter`: train a DSpark (markov, rnn), DFlash-style (--head none) or EAGLE-style
(--eagle) drafter against a frozen target.

A step takes --batch sequences; one batched target prefill gives each sequence's captured layer
features and next-token logits; up to --anchors anchor positions per sequence each give a gamma-token
block, all of a sequence's blocks in one drafter forward (they share the context K/V). Gradients of
the batch's sequences are accumulated, clipped to --clip, and AdamW steps with a linear warm-up
(--warmup fraction of the steps) then cosine decay to 10% of --lr.

The output folder is the drafter (config.json + model.safetensors, loadable by
DSparkDrafter.from_pretrained) plus trainer_state.pt (optimizer, schedule, data cursor, RNG) for
--resume, train_log.jsonl (one line per --log-every steps) and, at the end, held-out metrics in
config.json's "training" entry.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from dspark.drafters.dspark_layers import DSparkConfig
from dspark.drafters.dspark_model import DSparkModel, load_drafter_model, save_drafter
from dspark.drafters.dspark import save_draft_vocab
from dspark.train.data import anchor_positions, frequent_tokens, load_sequences
from dspark.train.feature_cache import FeatureCache
from dspark.train.loss import block_loss
from dspark.train.teacher import teacher_pass


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", required=True, help="jsonl of {prompt_ids, response_ids} (target token ids)")
    ap.add_argument("--out", required=True, help="output folder (the drafter; checkpoints go here too)")
    ap.add_argument("--model", default=None, help="target: GGUF or HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--layers", default=None, help="comma-separated 0-based target layers (default: 5 spread)")
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--head", choices=("markov", "gated", "rnn", "none"), default="markov")
    ap.add_argument("--qk-norm", action="store_true",
                    help="Qwen3-style q/k-norm in the draft layers (the authors' layer; needed to export to their "
                         "DeepSpec format)")
    ap.add_argument("--rank", type=int, default=256, help="Markov/RNN head rank r")
    ap.add_argument("--eagle", action="store_true", help="the EAGLE-style autoregressive baseline instead")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=float, default=0.04, help="warm-up fraction of the steps")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    ap.add_argument("--anchors", type=int, default=64, help="anchor positions (blocks) per sequence")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--sequences", type=int, default=None,
                    help="use the first N sequences of --data only (the hold-out comes from their end): on a CPU the "
                         "teacher's features cost a prefill per token, so a budget caps the data")
    ap.add_argument("--decay", type=float, default=4.0, help="position weight exp(-(k-1)/decay)")
    ap.add_argument("--holdout", type=int, default=16, help="sequences kept out for the final evaluation")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on a shared 2-core box 1 thread is often far faster: idle threads spin)")
    ap.add_argument("--resume", action="store_true", help="continue from --out's trainer_state.pt")
    ap.add_argument("--draft-vocab", type=int, default=0,
                    help="train (and draft) over the K most frequent response tokens of the data (FR-Spec "
                         "style; written to draft_vocab.json); 0: the whole vocabulary")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="bf16: the drafter's and the teacher's matrix products under bf16 autocast (fp32 weights, "
                         "optimizer and loss); auto: bf16 on CUDA and on CPUs that multiply bf16 natively "
                         "(AVX512-BF16 or AMX: ~3x fp32's GEMM rate on the 2-vCPU Zen 4), else fp32")
    ap.add_argument("--feature-cache", default=None,
                    help="folder for the target's features of every training sequence, built once (resumably) "
                         "and reused every epoch: the teacher prefill is most of a CPU step")


def autocast(args, device: str):
    """The bf16 autocast context of --precision (a no-op context for fp32)."""
    from dspark.models.linear import fast_bf16_gemm

    kind = torch.device(device).type
    bf16 = args.precision == "bf16" or (args.precision == "auto" and (kind == "cuda" or fast_bf16_gemm()))
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16)


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sequence_loss(model: DSparkModel, teacher, seq, anchors: torch.Tensor, decay: float,
                  vocab_ids: torch.Tensor | None = None):
    """Loss and metrics of one sequence's blocks (anchors [A] on the drafter's device), over the
    whole vocabulary or the draft vocabulary vocab_ids."""
    gamma, n = model.config.gamma, seq.ids.shape[0]
    device = anchors.device
    ids = seq.ids.to(device)
    logits, conf = model.train_forward(teacher.features.to(device), ids, anchors, vocab_ids)
    positions = anchors[:, None] + torch.arange(1, gamma + 1, device=device)  # x_k = t_{a+k}
    valid = positions < n
    positions = positions.clamp(max=n - 1)
    target_probs = teacher.probs_at((positions - 1).to(teacher.features.device), vocab_ids).to(device)
    return block_loss(logits, conf, None, ids[positions], valid, decay, vocab_ids=vocab_ids, target_probs=target_probs)


def build(args, target) -> DSparkModel:
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    config = DSparkConfig.for_target(target.config, layers, kind="eagle" if args.eagle else "dspark",
                                     head=args.head, num_layers=args.draft_layers, gamma=args.gamma, rank=args.rank,
                                     qk_norm=args.qk_norm)
    return DSparkModel(config)


class Cursor:
    """Epoch-shuffled order over the training sequences; its state is saved for --resume."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed, self.epoch, self.pos = count, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self):
        return torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.pos == self.count:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


def draft_vocabulary(args, target, train_set, device) -> torch.Tensor | None:
    if not args.draft_vocab:
        return None
    ids, covered = frequent_tokens(train_set, args.draft_vocab, tuple(target.config.eos_token_ids))
    save_draft_vocab(args.out, ids, covered, args.data)
    return torch.tensor(ids, dtype=torch.long, device=device)


def save(args, model, optimizer, scheduler, cursor, step, generator, extra) -> None:
    save_drafter(model, args.out, extra)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "cursor": cursor.state(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state()},
               os.path.join(args.out, "trainer_state.pt"))


def progress(total: int, initial: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc="train-drafter", dynamic_ncols=True)
    except ImportError:
        return None


@torch.no_grad()
def evaluate(model, target, sequences, args, generator, vocab_ids=None) -> dict:
    """Held-out loss, acceptance per position (1 - TV, teacher forced) and the expected tau."""
    model.eval()
    totals, count = {}, 0
    for start in range(0, len(sequences), args.batch):
        chunk = sequences[start: start + args.batch]
        for seq, teacher in zip(chunk, teacher_pass(target, [s.ids.to(target.device) for s in chunk],
                                                    tuple(model.config.target_layers))):
            anchors = anchor_positions(seq, args.anchors, generator).to(model.norm.device)
            with autocast(args, model.norm.device.type):
                _, m = sequence_loss(model, teacher, seq, anchors, args.decay, vocab_ids)
            for key, value in m.items():
                if isinstance(value, list):
                    totals[key] = [a + b for a, b in zip(totals.get(key, [0.0] * len(value)), value)]
                else:
                    totals[key] = totals.get(key, 0.0) + value
            count += 1
    model.train()
    return {k: [x / count for x in v] if isinstance(v, list) else v / count for k, v in totals.items()}


def train(args) -> dict:
    from dspark.models import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    target = load_model(args.model, torch.bfloat16 if device != "cpu" else torch.float32, device)
    sequences = load_sequences(args.data, target.config.vocab_size, args.max_len)
    if args.sequences is not None:
        if args.sequences < 2:
            raise ValueError(f"--sequences must be >= 2, got {args.sequences}")
        sequences = sequences[: args.sequences]
    holdout = min(args.holdout, len(sequences) // 10)
    train_set, eval_set = sequences[: len(sequences) - holdout], sequences[len(sequences) - holdout:]
    resuming = args.resume and os.path.exists(os.path.join(args.out, "trainer_state.pt"))
    model = load_drafter_model(args.out) if resuming else build(args, target)
    model = model.to(device).attach(target).train()
    total = args.steps or max(1, math.ceil(len(train_set) * args.epochs / args.batch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, int(args.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    cursor, generator, step = Cursor(len(train_set), args.seed), torch.Generator().manual_seed(args.seed), 0
    if resuming:
        state = torch.load(os.path.join(args.out, "trainer_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        cursor.load(state["cursor"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
    data_info = {"data": os.path.abspath(args.data), "sequences": len(train_set), "holdout_sequences": len(eval_set),
                 "tokens": int(sum(s.ids.numel() for s in train_set)),
                 "response_tokens": int(sum(s.ids.numel() - s.prompt_len for s in train_set))}
    vocab_ids = draft_vocabulary(args, target, train_set, device)
    history = run_steps(args, model, target, train_set, optimizer, scheduler, cursor, generator, step, total, data_info,
                        vocab_ids)
    result = {**data_info, "steps": total, "final_train": history[-1] if history else None}
    if eval_set:
        result["holdout"] = evaluate(model, target, eval_set, args, torch.Generator().manual_seed(args.seed + 1),
                                     vocab_ids)
    save(args, model, optimizer, scheduler, cursor, total, generator, {"training": result})
    return result


def train_step(args, model, target, batch, generator, teachers=None, vocab_ids=None) -> dict:
    """One step over `batch` [(index, Sequence)]; teachers: a FeatureCache, else a fresh teacher pass."""
    device = model.norm.device
    layers = tuple(model.config.target_layers)
    sums: dict = {}
    if teachers is not None:
        outputs = [teachers[i] for i, _ in batch]
    else:
        outputs = teacher_pass(target, [s.ids.to(target.device) for _, s in batch], layers)
    for (_, seq), teacher in zip(batch, outputs):
        anchors = anchor_positions(seq, args.anchors, generator).to(device)
        with autocast(args, device.type):
            loss, m = sequence_loss(model, teacher, seq, anchors, args.decay, vocab_ids)
        (loss / len(batch)).backward()
        for key in ("loss", "ce", "l1", "bce", "tau_est"):
            sums[key] = sums.get(key, 0.0) + m[key] / len(batch)
    sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
    return sums


def feature_cache(args, model, target, train_set):
    if not args.feature_cache:
        return None
    cache = FeatureCache(args.feature_cache, train_set, target, tuple(model.config.target_layers))
    if not cache.complete:
        print(f"building the feature cache in {args.feature_cache} ({cache.done}/{len(train_set)} done)", flush=True)
        cache.build(args.batch, progress(len(train_set), cache.done))
    return cache


def run_steps(args, model, target, train_set, optimizer, scheduler, cursor, generator, step, total, data_info,
              vocab_ids=None):
    os.makedirs(args.out, exist_ok=True)
    teachers = feature_cache(args, model, target, train_set)
    bar = progress(total, step)
    history, start = [], time.perf_counter()
    with open(os.path.join(args.out, "train_log.jsonl"), "a") as log:
        while step < total:
            batch = [(i, train_set[i]) for i in cursor.take(args.batch)]
            optimizer.zero_grad(set_to_none=True)
            metrics = train_step(args, model, target, batch, generator, teachers, vocab_ids)
            optimizer.step()
            scheduler.step()
            step += 1
            metrics.update(step=step, lr=scheduler.get_last_lr()[0], epoch=cursor.epoch,
                           elapsed_s=round(time.perf_counter() - start, 1))
            history.append(metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tau=f"{metrics['tau_est']:.2f}")
            if step % args.log_every == 0 or step == total:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if bar is None:
                    print(f"step {step}/{total} loss {metrics['loss']:.4f} tau_est {metrics['tau_est']:.2f}", flush=True)
            if step % args.save_every == 0 and step < total:
                save(args, model, optimizer, scheduler, cursor, step, generator, {"training": {**data_info, "step": step}})
    if bar is not None:
        bar.close()
    return history


def main(args) -> int:
    result = train(args)
    print(json.dumps({k: v for k, v in result.items() if k != "final_train"}, indent=2))
    return 0
