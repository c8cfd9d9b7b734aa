"""okdfast: online knowledge distillation via multi-branch diversity enhancement (Li et al., ACCV 2020), fast.

    import okdfast
    loss = okdfast.functional.online_kd_loss(logits, target)      # (B, K, C) branch logits
    criterion = okdfast.losses.OnlineKDLoss(temperature=3.0)

Training: ``python -m okdfast.train --help``; evaluation: ``python -m okdfast.evaluate RUN/best.pt``.
"""

from okdfast import functional, losses  # noqa: F401  (the public loss API; registers the torch.library ops)

__version__ = "0.1.0"
__all__ = ["functional", "losses", "__version__"]
