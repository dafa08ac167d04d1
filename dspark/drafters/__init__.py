"""Proposers: independent draft model or self-draft (DraftModelDrafter), n-gram prompt lookup."""

from dspark.drafters.base import Drafter, Proposal
from dspark.drafters.draft_model import DraftModelDrafter
from dspark.drafters.ngram import NgramDrafter

__all__ = ["Drafter", "Proposal", "DraftModelDrafter", "NgramDrafter"]
