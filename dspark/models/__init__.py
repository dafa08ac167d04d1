"""Target and draft transformers: a Llama-family decoder on dspark ops, and its loaders."""

from dspark.models.config import ModelConfig
from dspark.models.llama import LlamaModel
from dspark.models.loading import default_model_path, load_model, load_tokenizer

__all__ = ["ModelConfig", "LlamaModel", "load_model", "load_tokenizer", "default_model_path"]
