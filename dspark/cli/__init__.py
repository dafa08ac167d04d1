"""The `dspark` command: one module per subcommand group. Nothing in the library imports this package."""

from __future__ import annotations

import argparse
import sys

from dspark.cli import calibrate, drafter_tools, generate, profile, serve
from dspark.cli.generate import make_drafter, shipped_drafter


def parser() -> argparse.ArgumentParser:
    from dspark.train.trainer import add_arguments as add_training_arguments

    ap = argparse.ArgumentParser(prog="dspark")
    sub = ap.add_subparsers(dest="command", required=True)
    generate.add_arguments(sub.add_parser("generate", help="generate a reply with speculative decoding"))
    add_training_arguments(sub.add_parser("train-drafter", help="train a DSpark / DFlash-style / EAGLE-style drafter"))
    drafter_tools.add_draft_vocab_arguments(
        sub.add_parser("draft-vocab", help="write a drafter's draft vocabulary: its data's frequent tokens"))
    drafter_tools.add_corpus_arguments(
        sub.add_parser("corpus", help="write a drafter's corpus (the target's own replies) for corpus lookup"))
    drafter_tools.add_export_arguments(
        sub.add_parser("export-drafter", help="copy a trained drafter for shipping (weights in bf16), or write it in DeepSpec's format"))
    calibrate.add_arguments(sub.add_parser("calibrate", help="fit a drafter's confidence temperatures (STS)"))
    profile.add_arguments(sub.add_parser("profile", help="measure SPS(B), the target's steps/s per step size"))
    serve.add_arguments(sub.add_parser("serve", help="an OpenAI-compatible HTTP server with speculative decoding"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "train-drafter":
        from dspark.train.trainer import main as train_main

        return train_main(args)
    commands = {"generate": generate.run, "draft-vocab": drafter_tools.run_draft_vocab,
                "corpus": drafter_tools.run_corpus, "export-drafter": drafter_tools.run_export,
                "calibrate": calibrate.run, "profile": profile.run, "serve": serve.run}
    return commands[args.command](args)


__all__ = ["main", "parser", "make_drafter", "shipped_drafter"]

if __name__ == "__main__":
    sys.exit(main())
