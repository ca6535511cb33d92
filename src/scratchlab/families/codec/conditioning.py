"""Text conditioning of codec LMs as byte ids: the same encoding for training, eval and sampling.

A condition is the clip's text plus its tags (``"tags: a, b"`` on a second line), as UTF-8
bytes (ids 0..255). ``COND_BOS`` always comes first, so even the empty (unconditional)
condition has one key for cross-attention to attend to; ``COND_PAD`` fills a batch to its
longest condition and has ``cond_mask`` False.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COND_BOS = 256
COND_PAD = 257
COND_VOCAB = 258
DEFAULT_MAX_TEXT_BYTES = 256


def condition_text(text: str, tags: Sequence[str] = ()) -> tuple[str, str]:
    """``(text, tag line)`` of a condition; the tag line is empty without tags."""
    tags = [t.strip() for t in tags if t and t.strip()]
    return text.strip(), ("tags: " + ", ".join(tags)) if tags else ""


def condition_ids(text: str, tags: Sequence[str] = (), max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[int]:
    """``[COND_BOS] + UTF-8 bytes`` of text and tags, at most ``max_text_bytes`` bytes.

    When too long, the free text is cut (at a character boundary), not the tags: tags are short
    and are what users steer generation with.
    """
    body, tag_line = condition_text(text, tags)
    tag_bytes = tag_line.encode("utf-8")
    sep = b"\n" if body and tag_bytes else b""
    room = max(max_text_bytes - len(tag_bytes) - len(sep), 0)
    body_bytes = body.encode("utf-8")[:room].decode("utf-8", errors="ignore").encode("utf-8")
    data = (body_bytes + sep + tag_bytes)[:max_text_bytes].decode("utf-8", errors="ignore").encode("utf-8")
    return [COND_BOS, *data]


def collate_conditions(conditions: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cond_ids Long [B, C], cond_mask Bool [B, C])``, padded with COND_PAD to the longest; True = real."""
    lengths = [len(c) for c in conditions]
    width = max(lengths, default=1)
    # one tensor from padded lists (a per-row tensor costs more than the rows themselves)
    ids = torch.tensor([[*c, *[COND_PAD] * (width - len(c))] for c in conditions], dtype=torch.long)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]
    return ids.view(len(conditions), width), mask


def unconditional_ids() -> list[int]:
    """The empty condition (what ``uncond_prob`` trains and classifier-free guidance samples against)."""
    return [COND_BOS]


def decode_condition(ids: Sequence[int]) -> str:
    """The text of a condition's ids (for data_step0.txt and demos)."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
