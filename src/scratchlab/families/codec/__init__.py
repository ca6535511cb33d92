"""The codec LM family (`model.family: codec_lm`): multi-codebook audio-codec tokens in a delay pattern."""

from scratchlab.families.base import FamilySpec
from scratchlab.families.codec.model import CodecLM
from scratchlab.families.codec.sampler import sample
from scratchlab.families.codec.task import CodecTask

SPEC = FamilySpec(
    name="codec_lm",
    model=CodecLM,
    task=CodecTask,
    sample=sample,
    config_section="codec",
    description="music / speech LM over K codebooks of codec tokens (delay patterns, text conditions, CFG)",
)
