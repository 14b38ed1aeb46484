"""Losses: one documented function (and module) per loss."""

from kdlight.losses.kd import KDLoss, kd_loss

__all__ = ["KDLoss", "kd_loss"]
