"""The target model's interface: what the engine, the drafters and the trainer use of it.

`LlamaModel` (dspark's own decoder) and `HFCausalLM` (any transformers causal LM) implement it; a
serving stack embedding dspark can bring its own.
"""

from __future__ import annotations

import abc

import torch

from dspark.batch import Round
from dspark.cache import KVCache, SideCache
from dspark.models.config import ModelConfig
from dspark.models.quantized import QuantizedWeight


class TargetModel(abc.ABC):
    config: ModelConfig
    # True when forward's first output already is the logits (then `logits` passes it through): a
    # model that does not expose its final hidden states. Drafters trained on those states need False.
    forward_returns_logits: bool = False
    # True when plan and forward_planned are implemented: the rounds can then be captured in CUDA graphs.
    plans_rounds: bool = False

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The compute dtype, which the KV cache takes."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        ...

    @abc.abstractmethod
    def forward(self, cache: KVCache, rnd: Round,
                capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One flattened round over the KV cache (its K/V written at the round's slots): final-norm hidden
        states [T, hidden] (or logits, see forward_returns_logits) and the residual stream after each of
        capture_layers, [T, hidden] each."""

    def forward_capturing(self, cache: KVCache, rnd: Round, capture_layers: tuple[int, ...],
                          side: SideCache) -> torch.Tensor:
        """forward, with the captured residual streams concatenated (in forward's order) and written into
        `side` at the round's slots instead of returned. Default: through forward's list; a model may
        write them in place (LlamaModel's fused CPU layers do)."""
        out, captured = self.forward(cache, rnd, capture_layers)
        side.write(rnd.write_rows, rnd.write_slots, torch.cat(captured, dim=-1))
        return out

    def plan(self, cache: KVCache, rnd: Round, backend: str | None = None):
        """The round's attention plan for forward_planned (validated once; host reads allowed). A model
        that implements plan and forward_planned sets plans_rounds."""
        raise NotImplementedError(f"{type(self).__name__} has no planned forward")

    def forward_planned(self, cache: KVCache, rnd: Round, plan, capture_layers: tuple[int, ...] = (),
                        side: SideCache | None = None) -> torch.Tensor:
        """forward_capturing (or forward's first output, with no side cache) over a round planned by
        `plan`, with no validation and no host reads, so that on CUDA it can be captured in a graph and
        replayed over new values of the same round tensors (dspark.round_graphs)."""
        raise NotImplementedError(f"{type(self).__name__} has no planned forward")

    @abc.abstractmethod
    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, V] from forward's first output."""

    @abc.abstractmethod
    def shared_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding [V, hidden], LM head [V, hidden]) as dense tensors of the compute dtype, which
        drafters share."""

    def lm_head(self) -> torch.Tensor | QuantizedWeight:
        """The LM head [V, hidden] as the model computes with it: GGUF blocks when it was loaded natively.
        Drafters' inference-time logits may use it where it is cheaper than the dense copy (default:
        shared_weights()'s dense head)."""
        return self.shared_weights()[1]

    def check_context(self, max_seq_len: int) -> None:
        """Raise if caches of max_seq_len tokens are beyond what the model supports (default: any is fine)."""
