"""Triton kernels and their host launchers (installed as ``okdfast.kernels``): no nn.Module, no autograd.

Modules import ``triton`` at import time, so nothing imports them eagerly: the ops in ``okdfast.ops`` load them
when a tensor is dispatched to Triton (``okdfast.ops.dispatch``).

- ``online_kd``: the fused multi-branch online-KD loss (CE, teacher CE, T^2 KL; ensemble and peer modes; teachers
  as explicit logits or as weights over the branches).
- ``augment``: the GPU loader's gather / crop / flip / normalise kernel.
"""
