"""Model families built from config."""

from scratchlab.models.lm import TransformerLM
from scratchlab.models.registry import build_model

__all__ = ["TransformerLM", "build_model"]
