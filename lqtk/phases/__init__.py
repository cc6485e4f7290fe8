from lqtk.phases.block_tuning import BlockTuning
from lqtk.phases.distill import KLDistillation
from lqtk.phases.finetune import BlockFinetune
from lqtk.phases.layerwise import LayerwiseCalibration
from lqtk.phases.requantize import MixedCalibration, Requantize

__all__ = ["BlockFinetune", "BlockTuning", "KLDistillation", "LayerwiseCalibration", "MixedCalibration", "Requantize"]
