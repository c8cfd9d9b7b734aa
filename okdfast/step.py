"""One optimizer step of the training loop, with the speed features in one place.

    forward + loss     (one function, compiled together by ``--compile``: the fused loss op is a torch.library op
                        so the graph does not break at the loss)
    backward           (through a GradScaler for fp16)
    optimizer step     (fused SGD on CUDA, foreach elsewhere; compiled as well for --cuda-graphs)

``--cuda-graphs`` compiles the forward+loss and the optimizer step with ``mode="reduce-overhead"`` (inductor's CUDA
graph trees), so the whole step replays as CUDA graphs when shapes are static. The last partial batch of an epoch
has another shape: it runs the same code un-graphed (eager) rather than being dropped or triggering a capture.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from okdfast.methods import Method


class TrainStep:
    def __init__(
        self,
        method: Method,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        compile_mode: str = "off",
        cuda_graphs: bool = False,
        full_batch: int | None = None,
    ) -> None:
        self.method = method
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.device = device
        self.amp_dtype = amp_dtype
        self.full_batch = full_batch
        if cuda_graphs and device.type != "cuda":
            raise ValueError("--cuda-graphs needs a CUDA device; drop the flag on the CPU")
        if cuda_graphs and scaler is not None:
            raise ValueError("--cuda-graphs with --amp fp16 is not supported (the GradScaler syncs); use --amp bf16")
        mode = "reduce-overhead" if cuda_graphs else (None if compile_mode == "default" else compile_mode)
        self.compiled = compile_mode != "off" or cuda_graphs
        self.cuda_graphs = cuda_graphs
        self._forward_loss_fast = torch.compile(self.forward_loss, mode=mode) if self.compiled else self.forward_loss
        self._optimizer_step_fast = (
            torch.compile(self.optimizer.step, mode=mode) if cuda_graphs else self.optimizer.step
        )

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    def forward_loss(self, images: Tensor, target: Tensor, kd_weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.autocast():
            output = self.model(images)
            return self.method.loss(output, target, kd_weight)

    def __call__(self, images: Tensor, target: Tensor, kd_weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        static = self.full_batch is None or images.shape[0] == self.full_batch
        if self.cuda_graphs:
            # A graph replays into the same output buffers: clone what outlives the step.
            torch.compiler.cudagraph_mark_step_begin()
        forward_loss = self._forward_loss_fast if static or not self.cuda_graphs else self.forward_loss
        total, terms = forward_loss(images, target, kd_weight)
        self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            (self._optimizer_step_fast if static else self.optimizer.step)()
        if self.cuda_graphs:
            total, terms = total.detach().clone(), {k: v.clone() for k, v in terms.items()}
        return total, terms


def build_optimizer(
    parameters: Any,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    implementation: str,
    device: torch.device,
    lr_as_tensor: bool = False,
) -> torch.optim.Optimizer:
    """SGD with the fused CUDA kernel ('fused'), multi-tensor ops ('foreach') or the per-parameter loop.

    'auto': fused on CUDA, foreach elsewhere. Weight decay applies to every parameter, as in the OKDDip code.
    ``lr_as_tensor``: the learning rate as a 0-dim tensor on ``device`` (for --cuda-graphs: the compiled, graphed
    optimizer step then reads the lr the scheduler writes in place, instead of recompiling at every new value).
    """
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "foreach"
    options: dict[str, Any] = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
    }[implementation]
    return torch.optim.SGD(
        parameters,
        lr=torch.tensor(float(lr), device=device) if lr_as_tensor else lr,
        momentum=momentum,
        nesterov=nesterov and momentum > 0,
        weight_decay=weight_decay,
        **options,
    )
