"""Distillation methods as components: what a :class:`~kdlight.lit.DistillationModule`
minimises, given the student's and the frozen teacher's outputs.

- logits: :class:`KD` (Hinton et al., 2015), :class:`DKD` (Zhao et al., 2022) and
  :class:`DIST` (Huang et al., 2022), each with optional logit standardization (Sun et al.,
  2024);
- logits at a temperature learned against the student: :class:`CTKD` (Li et al., 2023);
- logits at several temperatures, per sample, batch and class, on a weak and a strong view
  of each image: :class:`MLKD` (Jin et al., 2023);
- logits against a power transform of the teacher's probabilities: :class:`TTM` and
  :class:`WTTM` (Zheng and Yang, 2024);
- stage outputs: :class:`FitNet`, :class:`AT`, :class:`SP`, :class:`VID`, :class:`NST`,
  :class:`KDSVD`;
- stage outputs before their ReLU, against the teacher's above a margin: :class:`OFD`
  (Heo et al., 2019);
- pooled features: :class:`PKT`, :class:`RKD`, :class:`CC`, :class:`CRD`.

The interface a method follows (a user's own needs no kdlight base class) is in
:mod:`kdlight.distillers.base`. Hydra: ``conf/distiller/<method>.yaml``, e.g.
``kdlight-train experiment=distill distiller=dkd distiller.beta=2``.
"""

from kdlight.distillers.base import (
    Distiller,
    FeatureDistiller,
    Outputs,
    method_name,
    method_settings,
    resolve_taps,
)
from kdlight.distillers.feature import AT, KDSVD, NST, SP, VID, FitNet
from kdlight.distillers.logit import CTKD, DIST, DKD, KD, MLKD, TTM, WTTM
from kdlight.distillers.overhaul import OFD
from kdlight.distillers.relational import CC, CRD, PKT, RKD

__all__ = [
    "AT",
    "CC",
    "CRD",
    "CTKD",
    "DIST",
    "DKD",
    "KD",
    "MLKD",
    "OFD",
    "KDSVD",
    "NST",
    "PKT",
    "RKD",
    "SP",
    "TTM",
    "VID",
    "WTTM",
    "Distiller",
    "FeatureDistiller",
    "FitNet",
    "Outputs",
    "method_name",
    "method_settings",
    "resolve_taps",
]
