"""Lightning systems: ``ClassifierModule`` (teacher or baseline) and ``DistillationModule``."""

from kdlight.lit.base import ClassificationSystem
from kdlight.lit.classifier import ClassifierModule

__all__ = ["ClassificationSystem", "ClassifierModule"]
