"""Losses: one documented function per loss, one file per method family.

Logit methods: ``kd_loss`` (Hinton et al., 2015; ``standardize=True`` for logit
standardization, Sun et al., 2024) and ``dkd_loss`` (decoupled KD, Zhao et al., 2022).
Feature methods: ``at_loss`` and ``sp_loss`` (attention and similarity maps of stage
outputs), ``hint_loss`` and ``vid_loss`` (a stage regressed onto the teacher's, FitNet and
VID, with their trainable ``ConvRegressor`` and ``VIDRegressor``), ``pkt_loss`` and
``rkd_loss`` (relations between pooled embeddings) and ``crd_loss`` (contrastive, with
``Embed``, ``ContrastMemory`` and ``NegativeSampler``). Each docstring gives the formula,
the reduction and the weight its method applies (the loss itself applies none). Every loss
is computed in float32, also under mixed precision, and the teacher's inputs carry no
gradient.
"""

from kdlight.losses.attention import at_loss, sp_loss
from kdlight.losses.contrastive import (
    ContrastMemory,
    Embed,
    NegativeSampler,
    crd_loss,
    sample_contrast_indices,
)
from kdlight.losses.dkd import dkd_loss
from kdlight.losses.hint import ConvRegressor, VIDRegressor, hint_loss, vid_loss
from kdlight.losses.kd import KDLoss, kd_loss, standardize_logits
from kdlight.losses.relational import pkt_loss, rkd_loss

__all__ = [
    "ContrastMemory",
    "ConvRegressor",
    "Embed",
    "KDLoss",
    "NegativeSampler",
    "VIDRegressor",
    "crd_loss",
    "hint_loss",
    "sample_contrast_indices",
    "vid_loss",
    "at_loss",
    "dkd_loss",
    "kd_loss",
    "pkt_loss",
    "rkd_loss",
    "sp_loss",
    "standardize_logits",
]
