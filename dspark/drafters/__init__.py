"""Proposers: independent draft model or self-draft (DraftModelDrafter), n-gram prompt lookup, and the
target-conditioned DSpark drafter (DSparkDrafter; also its DFlash-style and EAGLE-style baselines), and
HybridDrafter (n-gram lookup where the context repeats, a DSpark drafter elsewhere)."""

from dspark.drafters.base import Drafter, Proposal
from dspark.drafters.draft_model import DraftModelDrafter
from dspark.drafters.dspark import DSparkDrafter
from dspark.drafters.hybrid import HybridDrafter
from dspark.drafters.ngram import NgramDrafter

__all__ = ["Drafter", "Proposal", "DraftModelDrafter", "DSparkDrafter", "HybridDrafter", "NgramDrafter"]
