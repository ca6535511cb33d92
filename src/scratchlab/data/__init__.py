"""Data: documents -> tokens on disk -> windows."""

from scratchlab.data.text import TextData, open_text_data, prepare_stdlib, prepare_text
from scratchlab.data.windows import get_batch, make_windows, window_starts

__all__ = ["TextData", "open_text_data", "prepare_stdlib", "prepare_text", "get_batch", "make_windows", "window_starts"]
