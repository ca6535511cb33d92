"""The cascade family (`model.family: cascade`): stages of causal decoders over continuous frames."""

from scratchlab.families.base import FamilySpec
from scratchlab.families.cascade.model import CascadeModel
from scratchlab.families.cascade.monitors import monitors
from scratchlab.families.cascade.sampler import sample
from scratchlab.families.cascade.task import CascadeTask

SPEC = FamilySpec(
    name="cascade",
    model=CascadeModel,
    task=CascadeTask,
    sample=sample,
    config_section="cascade",
    monitors=monitors,
    description="continuous-signal cascade: stages of causal decoder blocks over float frames",
)
