from lqtk.phases.layerwise import LayerwiseCalibration

__all__ = ["LayerwiseCalibration"]
