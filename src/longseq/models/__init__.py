from longseq.models.llama import CausalLM
from longseq.models.loader import LoadedModel, default_model_path, load, load_model

__all__ = ["CausalLM", "LoadedModel", "default_model_path", "load", "load_model"]
