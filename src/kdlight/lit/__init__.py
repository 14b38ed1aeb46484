"""Lightning systems: ``ClassifierModule`` (a teacher or a baseline), ``DistillationModule``
and ``DistillationGridModule`` (a whole T x alpha grid of students sharing one teacher),
one distillation system for one student or many; ``load_teacher`` and ``load_model``
read their checkpoints back as plain models."""

from kdlight.lit.base import ClassificationSystem
from kdlight.lit.classifier import ClassifierModule
from kdlight.lit.distillation import DistillationModule
from kdlight.lit.grid import DistillationGridModule
from kdlight.lit.loading import load_model
from kdlight.teacher import freeze, load_teacher  # re-exported: kdlight.lit.load_teacher

__all__ = [
    "ClassificationSystem",
    "ClassifierModule",
    "DistillationGridModule",
    "DistillationModule",
    "freeze",
    "load_model",
    "load_teacher",
]
