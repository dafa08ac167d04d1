"""Target and draft transformers: a Llama-family decoder on dspark ops, its loaders, and an adapter
that runs any transformers causal LM on dspark's KV cache."""

from dspark.models.config import ModelConfig
from dspark.models.hf_adapter import HFCausalLM
from dspark.models.llama import LlamaModel
from dspark.models.loading import default_model_path, load_model, load_tokenizer
from dspark.models.target import TargetModel

__all__ = ["HFCausalLM", "ModelConfig", "LlamaModel", "TargetModel", "load_model", "load_tokenizer", "default_model_path"]
