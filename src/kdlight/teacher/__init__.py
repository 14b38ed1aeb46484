"""The teacher's side of distillation: :mod:`.find` says which teacher a run reads,
:mod:`.loading` reads a teacher from a file and freezes it, :mod:`.frozen` is the frozen
teacher that a distillation system holds (with its taps, its cache and its test accuracy),
:mod:`.cache` the exact cache of its outputs."""

from kdlight.teacher.frozen import FrozenTeacher
from kdlight.teacher.loading import freeze, load_teacher

__all__ = ["FrozenTeacher", "freeze", "load_teacher"]
