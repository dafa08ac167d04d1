"""Proposers: independent draft model or self-draft (DraftModelDrafter), n-gram prompt lookup, and the
target-conditioned DSpark drafter (DSparkDrafter; also its DFlash-style and EAGLE-style baselines), and
HybridDrafter (n-gram lookup where the context repeats, then corpus lookup in the target's own replies
(dspark.drafters.corpus), a DSpark drafter elsewhere). DSparkDrafter also
reads the authors' DeepSpec DSpark/DFlash folders; Eagle3Drafter runs their EAGLE-3 ones."""

from dspark.drafters.base import Drafter, Proposal
from dspark.drafters.draft_model import DraftModelDrafter
from dspark.drafters.dspark import DSparkDrafter
from dspark.drafters.eagle3 import Eagle3Drafter
from dspark.drafters.hybrid import HybridDrafter
from dspark.drafters.ngram import NgramDrafter

__all__ = ["Drafter", "Proposal", "DraftModelDrafter", "DSparkDrafter", "Eagle3Drafter", "HybridDrafter", "NgramDrafter"]
