"""The text tokenizer: byte-level BPE trained here, or a user's HF ``tokenizer.json``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from scratchlab.errors import UserError

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB = 260  # byte-level alphabet (256) + EOS + a few merges


def train_tokenizer(docs: Iterable[str], vocab_size: int, length: int | None = None):
    """Byte-level BPE (GPT-2 style pre-tokenization) with one special token, EOS.

    ``docs`` may be a generator: the trainer counts words as they stream by, it keeps no texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if length is None and isinstance(docs, list):
        length = len(docs)
    tokenizer.train_from_iterator(docs, trainer=trainer, length=length)
    return tokenizer


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise UserError(f"tokenizer file {path} could not be read ({exc}); give a HF tokenizers tokenizer.json") from exc


def _is_byte_level(tokenizer) -> bool:
    spec = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
    kinds = [spec.get("type")] + [part.get("type") for part in spec.get("pretokenizers", [])]
    return "ByteLevel" in kinds


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for; special tokens count 0 (they are not text)."""
    vocab_size = tokenizer.get_vocab_size()
    lengths = np.zeros(vocab_size, dtype=np.int32)
    special = {tok.content for tok in tokenizer.get_added_tokens_decoder().values() if tok.special}
    byte_level = _is_byte_level(tokenizer)
    for token_id in range(vocab_size):
        piece = tokenizer.id_to_token(token_id)
        if piece is None or piece in special:
            continue
        # Byte-level BPE maps every byte to one printable character, so the piece's length is its byte count.
        lengths[token_id] = len(piece) if byte_level else len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths
