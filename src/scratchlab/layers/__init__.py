"""Shared building blocks of every family: norms, RoPE, attention (MHA/GQA/MLA), FFNs (dense/MoE), init."""
