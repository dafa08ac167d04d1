"""Drafter training with the target frozen (DSPARK.md section 3): `dspark train-drafter`.

data.py    the token-id dataset (jsonl: {"prompt_ids": [...], "response_ids": [...]} per line)
teacher.py one frozen target pass per sequence: captured layer features and next-token logits
loss.py    0.1 CE + 0.9 L1 (2 x total variation) + 1.0 confidence BCE, position weights exp(-(k-1)/4)
trainer.py the loop: anchors, AdamW, warm-up, clipping, checkpoints and resume, progress
selfgen.py builds the dataset: the target's own replies to instructions made offline
"""
