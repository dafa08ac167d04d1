"""`dspark draft-vocab`, `dspark corpus` and `dspark export-drafter`: preparing a trained drafter for use and
shipping."""

from __future__ import annotations

import argparse

import torch

from dspark.models import load_model
from dspark.models.dtypes import DTYPES


def add_draft_vocab_arguments(vocab: argparse.ArgumentParser) -> None:
    vocab.add_argument("--drafter", required=True, help="drafter folder (gets draft_vocab.json)")
    vocab.add_argument("--data", required=True, help="the training jsonl")
    vocab.add_argument("--size", type=int, default=16384)
    vocab.add_argument("--model", default=None, help="target (for its vocabulary and EOS ids)")


def add_corpus_arguments(corpus: argparse.ArgumentParser) -> None:
    corpus.add_argument("--drafter", required=True, help="drafter folder (gets corpus.safetensors)")
    corpus.add_argument("--data", required=True, action="append",
                        help="a jsonl of the target's own replies (response_ids), e.g. the drafter's self-generated "
                             "training data; never the evaluation prompts' replies (repeatable)")


def add_export_arguments(export: argparse.ArgumentParser) -> None:
    export.add_argument("source", help="the drafter folder written by train-drafter (and calibrate)")
    export.add_argument("destination", help="e.g. dspark/drafters/pretrained/smollm2-135m-instruct")
    export.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    export.add_argument("--format", choices=("dspark", "deepspec"), default="dspark",
                        help="deepspec: the authors' checkpoint format (Qwen3DSparkModel), which vLLM, SGLang and "
                             "llama.cpp load; needs a drafter trained with --qk-norm, --model and --mask-token-id")
    export.add_argument("--model", default=None, help="the target (deepspec: its embedding and LM head are stored)")
    export.add_argument("--mask-token-id", type=int, default=None,
                        help="deepspec: the token id whose embedding row holds the mask embedding; pick one the "
                             "target never emits (a reserved or padding token)")


def run_draft_vocab(args) -> int:
    from dspark.drafters.dspark import save_draft_vocab
    from dspark.train.data import frequent_tokens, load_sequences

    if args.size < 1:
        raise ValueError(f"--size must be >= 1, got {args.size}")
    config = load_model(args.model, torch.float32).config
    sequences = load_sequences(args.data, config.vocab_size, max_len=1 << 30)
    ids, covered = frequent_tokens(sequences, args.size, tuple(config.eos_token_ids))
    save_draft_vocab(args.drafter, ids, covered, args.data)
    print(f"{len(ids)} draft tokens cover {covered:.2%} of the data's response tokens")
    return 0


def run_corpus(args) -> int:
    import json
    import os

    from dspark.drafters.corpus import CORPUS_FILE, CorpusIndex, write_corpus

    sequences = []
    for path in args.data:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    sequences.append([int(t) for t in json.loads(line)["response_ids"]])
                except (ValueError, KeyError, TypeError) as error:
                    raise ValueError(f"{path}:{number}: expected a JSON object with response_ids (token ids): "
                                     f"{error!r}") from error
    if not sequences:
        raise ValueError(f"--data holds no replies: {args.data}")
    index = CorpusIndex.build(sequences)  # first: bad ids fail before anything is written
    path = os.path.join(args.drafter, CORPUS_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    write_corpus(tmp, sequences)
    os.replace(tmp, path)
    print(f"{path}: {len(sequences)} replies, {sum(map(len, sequences))} tokens; "
          f"{len(index)} n-grams seen at least twice")
    return 0


def run_export(args) -> int:
    from dspark.drafters.dspark_model import export_drafter, load_drafter_model

    if args.format == "deepspec":
        from dspark.drafters.deepspec_format import export_deepspec

        if args.model is None or args.mask_token_id is None:
            raise ValueError("--format deepspec needs --model (the target) and --mask-token-id")
        target = load_model(args.model, torch.float32)
        drafter = load_drafter_model(args.source, target)
        sizes = export_deepspec(drafter, args.destination, args.mask_token_id, target.config.num_layers,
                                DTYPES[args.dtype])
    else:
        sizes = export_drafter(args.source, args.destination, DTYPES[args.dtype])
    print("\n".join(f"{name}: {size / 1e6:.1f} MB" for name, size in sorted(sizes.items())))
    return 0
