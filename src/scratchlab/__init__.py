"""scratchlab: train autoregressive transformers from scratch, and catch the silent bugs."""

__version__ = "0.1.0"
