"""``nn.Module`` forms of okdfast's fused losses (the functions are in :mod:`okdfast.functional`)."""

from okdfast.losses.online_kd import ClassifierDiversityLoss, MDEHeadLoss, OnlineKDLoss

__all__ = ["ClassifierDiversityLoss", "MDEHeadLoss", "OnlineKDLoss"]
