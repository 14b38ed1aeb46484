"""Losses: one documented function per loss, one file per method family. On logits:
``kd`` (and logit standardization), ``dkd``, ``dist``, ``ctkd`` (with its gradient
reversal), ``ttm`` (TTM, WTTM) and ``multilevel`` (MLKD). On stage outputs: ``hint``
(FitNet, VID, with their trainable connectors), ``attention`` (AT, SP), ``kernels`` (NST,
KDSVD: kernels of the outputs rather than the outputs) and ``overhaul`` (OFD, before the
ReLU, with its connectors). On pooled embeddings: ``relational`` (PKT, RKD, CC) and
``contrastive`` (CRD, with its embedding heads, memory banks and sampler of negatives).
Each docstring gives the formula, the reduction and the weight its method applies (the loss
itself applies none). Every loss is computed in float32, also under mixed precision, and the
teacher's inputs carry no gradient (but CC's, the output of a connector that it trains).
"""

from kdlight.losses.attention import at_loss, sp_loss
from kdlight.losses.contrastive import (
    ContrastMemory,
    Embed,
    NegativeSampler,
    crd_loss,
    sample_contrast_indices,
)
from kdlight.losses.ctkd import ctkd_loss, reverse_gradient
from kdlight.losses.dist import dist_loss
from kdlight.losses.dkd import dkd_loss
from kdlight.losses.hint import ConvRegressor, VIDRegressor, hint_loss, vid_loss
from kdlight.losses.kd import KDLoss, kd_loss, standardize_logits
from kdlight.losses.kernels import kdsvd_loss, nst_loss
from kdlight.losses.multilevel import mlkd_loss
from kdlight.losses.overhaul import OFDConnector, ofd_loss, ofd_margins, partial_l2
from kdlight.losses.relational import cc_loss, pkt_loss, rkd_loss
from kdlight.losses.ttm import ttm_loss, wttm_loss

__all__ = [
    "ContrastMemory",
    "ConvRegressor",
    "Embed",
    "KDLoss",
    "NegativeSampler",
    "OFDConnector",
    "VIDRegressor",
    "cc_loss",
    "crd_loss",
    "ctkd_loss",
    "hint_loss",
    "sample_contrast_indices",
    "vid_loss",
    "at_loss",
    "dist_loss",
    "dkd_loss",
    "kd_loss",
    "ofd_loss",
    "ofd_margins",
    "partial_l2",
    "kdsvd_loss",
    "nst_loss",
    "mlkd_loss",
    "pkt_loss",
    "reverse_gradient",
    "rkd_loss",
    "sp_loss",
    "standardize_logits",
    "ttm_loss",
    "wttm_loss",
]
