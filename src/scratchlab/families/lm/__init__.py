"""The text LM family (`model.family: lm`): a decoder-only transformer over BPE tokens."""

from scratchlab.families.base import FamilySpec
from scratchlab.families.lm.export import HF_EXPORTER
from scratchlab.families.lm.model import TransformerLM
from scratchlab.families.lm.sampler import sample
from scratchlab.families.lm.task import LMTask

SPEC = FamilySpec(
    name="lm",
    model=TransformerLM,
    task=LMTask,
    sample=sample,
    exporters={"hf": HF_EXPORTER},
    description="decoder-only text LM (dense or MLA + MoE) over BPE tokens",
)
