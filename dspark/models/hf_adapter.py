"""Any transformers causal LM as target or drafter.

dspark's KV cache (contiguous) holds the model's keys and values. A round runs the model on its
tokens, padded per request, with the committed K/V passed as past, a 4D mask that gives each node its
committed prefix and its ancestors-or-self, and explicit position ids; the round's new K/V are then
copied into the cache at slots cache_seqlens[r] + i, where kv_rollback compacts them like ours.
"""

from __future__ import annotations

import torch

from dspark import tree
from dspark.batch import Round
from dspark.cache import KVCache
from dspark.models.config import ModelConfig
from dspark.models.target import TargetModel


class HFCausalLM(TargetModel):
    forward_returns_logits = True

    def __init__(self, hf_model):
        self.hf = hf_model.eval()
        cfg = hf_model.config
        heads = cfg.num_attention_heads
        eos = cfg.eos_token_id
        self.config = ModelConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @torch.inference_mode()
    def forward(self, cache: KVCache, rnd: Round, capture_layers: tuple[int, ...] = ()):
        """Returns (logits [T, V] in the round's flat order, captured residual streams)."""
        from transformers import DynamicCache

        if cache.block_table is not None:
            raise ValueError("the transformers adapter needs a contiguous KV cache (block_size=None)")
        offsets = rnd.qo_indptr.tolist()
        rows = [r for r in range(len(offsets) - 1) if offsets[r + 1] > offsets[r]]
        committed = [int(cache.seqlens[r]) for r in rows]
        counts = [offsets[r + 1] - offsets[r] for r in rows]
        batch, past, width = len(rows), max(committed), max(counts)
        device = self.device
        ids = torch.zeros(batch, width, dtype=torch.long, device=device)
        positions = torch.zeros(batch, width, dtype=torch.long, device=device)
        visible = torch.zeros(batch, 1, width, past + width, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            start, n, base = offsets[r], counts[b], committed[b]
            ids[b, :n] = rnd.tokens[start: start + n]
            positions[b, :n] = rnd.positions[start: start + n]
            parents = list(range(-1, n - 1)) if rnd.parents is None else rnd.parents[start: start + n].tolist()
            visible[b, 0, :n, :base] = True
            visible[b, 0, :n, past: past + n] = tree.ancestor_mask(parents).to(device)
            visible[b, 0, n:, past + n:] = torch.eye(width - n, dtype=torch.bool, device=device)  # padding rows
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=device).masked_fill(~visible, torch.finfo(self.dtype).min)
        kv = DynamicCache()
        row_index = torch.tensor(rows, device=device)
        for layer in range(self.config.num_layers):
            keys = cache.k[layer, row_index, :past].transpose(1, 2)  # [B, H_kv, past, D]
            values = cache.v[layer, row_index, :past].transpose(1, 2)
            kv.update(keys, values, layer)
        out = self.hf(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=kv, use_cache=True,
                      output_hidden_states=bool(capture_layers))
        for layer in range(self.config.num_layers):
            entry = kv.layers[layer] if hasattr(kv, "layers") else None
            new_k = (entry.keys if entry is not None else kv.key_cache[layer])[:, :, past:]
            new_v = (entry.values if entry is not None else kv.value_cache[layer])[:, :, past:]
            for b, r in enumerate(rows):
                n, base = counts[b], committed[b]
                cache.k[layer, r, base: base + n] = new_k[b, :, :n].transpose(0, 1)
                cache.v[layer, r, base: base + n] = new_v[b, :, :n].transpose(0, 1)
        flat = torch.cat([out.logits[b, : counts[b]] for b in range(batch)])
        captured = [torch.cat([out.hidden_states[i + 1][b, : counts[b]] for b in range(batch)]) for i in capture_layers]
        return flat.float(), captured

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return out  # forward already returns logits

    def shared_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hf.get_input_embeddings().weight.detach(), self.hf.get_output_embeddings().weight.detach()
