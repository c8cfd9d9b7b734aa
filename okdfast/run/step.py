"""One optimizer step of the training loop, with the speed features in one place.

    forward + loss     one function, compiled together by ``--compile`` (the fused loss op is a torch.library op,
                       so the graph does not break at the loss)
    backward           through a GradScaler for fp16
    optimizer step     fused SGD on CUDA, foreach elsewhere

Which CUDA graphs (one meaning per flag; benchmarks/GPU.md):

- ``--compile max-autotune`` and ``--compile reduce-overhead`` (without ``--cuda-graphs``) turn on Inductor's own
  CUDA graphs (cudagraph trees) for the compiled forward + loss and its backward; the optimizer step runs eagerly
  between them. Inductor replays into the same output buffers, so the step marks each step's beginning and clones
  the loss terms it returns.
- ``--cuda-graphs`` is okdfast's step graph: the whole step (forward, loss, backward and the optimizer step) is
  captured once into one ``torch.cuda.CUDAGraph`` after ``GRAPH_WARMUP_STEPS`` eager warm-up steps on a side
  stream (lazy initialisation, compilation, the optimizer's momentum buffers), then replayed. Between replays only
  this runs eagerly: the copies of the batch (images, labels, kd weight) into the graph's static inputs, the clones
  of the returned loss terms, and whatever the caller does (the loader's kernels, the lr scheduler's in-place write
  into the tensor lr once per epoch). The last partial batch of an epoch has another shape: it runs eagerly
  (compiled with ``--compile``) on the same parameters, gradients and momentum buffers, and is never dropped.
- Both together: ``--cuda-graphs`` wins, as one graph can hold the whole step and Inductor's graphs cannot nest
  inside it. ``--compile`` then only chooses the kernels inside okdfast's graph: 'default' and 'reduce-overhead'
  compile as 'default', 'max-autotune' as 'max-autotune-no-cudagraphs' (its autotuned kernels, not its graphs).
  :func:`resolve_compile_mode` spells this once.
``--cuda-graphs`` needs CUDA, no GradScaler (``--amp fp16`` syncs on the host) and one process (not under DDP).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from okdfast.methods import Method

GRAPH_WARMUP_STEPS = 3  # eager steps before the capture (what the PyTorch CUDA-graph recipe warms up)
INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes with Inductor's CUDA graphs


def resolve_compile_mode(compile_mode: str, cuda_graphs: bool) -> str | None:
    """The ``torch.compile`` mode of the forward + loss: None (no compile), 'default' (passed as mode=None),
    'reduce-overhead', 'max-autotune' or, inside okdfast's step graph, a mode without Inductor's CUDA graphs."""
    if compile_mode not in ("off", "default", "max-autotune", "reduce-overhead"):
        raise ValueError(f"compile_mode={compile_mode!r}: use off, default, max-autotune or reduce-overhead")
    if compile_mode == "off":
        return None
    if cuda_graphs:
        return "max-autotune-no-cudagraphs" if compile_mode == "max-autotune" else "default"
    return compile_mode


def _clone(total: Tensor, terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    return total.detach().clone(), {k: v.detach().clone() for k, v in terms.items()}


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
        if cuda_graphs and isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("--cuda-graphs is not supported under torchrun (DDP's all-reduce is not captured)")
        self.cuda_graphs = cuda_graphs
        self.compile_mode = resolve_compile_mode(compile_mode, cuda_graphs)
        self.compiled = self.compile_mode is not None
        self.inductor_graphs = self.compile_mode in INDUCTOR_GRAPH_MODES and device.type == "cuda"
        mode = None if self.compile_mode == "default" else self.compile_mode
        self._forward_loss_fast = torch.compile(self.forward_loss, mode=mode) if self.compiled else self.forward_loss
        # a captured optimizer step must not read its tensor lr on the host: fused SGD does not, foreach and the
        # for-loop do (alpha=-lr), so they are compiled (traced with the lr as a tensor)
        fused = bool(optimizer.defaults.get("fused"))
        self._optimizer_step = torch.compile(optimizer.step) if cuda_graphs and not fused else optimizer.step
        self.graph: torch.cuda.CUDAGraph | None = None
        self._warmup_left = GRAPH_WARMUP_STEPS
        self._static: tuple[Tensor, Tensor, Tensor] | None = None
        self._static_out: tuple[Tensor, dict[str, Tensor]] | None = None

    def describe(self) -> str:
        """One line for the run's log: which graphs and which compile mode this step really uses."""
        compile_part = f"compile {self.compile_mode}" if self.compiled else "eager"
        if self.cuda_graphs:
            return f"{compile_part} inside okdfast's step graph (forward, loss, backward, optimizer step)"
        if self.inductor_graphs:
            return f"{compile_part} with Inductor's CUDA graphs (forward + loss and backward; optimizer step eager)"
        return compile_part

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        # inside a graph capture the autocast weight cache would hold tensors of the capture's pool
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not self.cuda_graphs)

    def forward_loss(self, images: Tensor, target: Tensor, kd_weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.autocast():
            output = self.model(images)
            return self.method.loss(output, target, kd_weight)

    def __call__(self, images: Tensor, target: Tensor, kd_weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        static = self.full_batch is None or images.shape[0] == self.full_batch
        if self.cuda_graphs and static:
            return self._graphed_step(images, target, kd_weight)
        if self.inductor_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # Inductor may overwrite the last step's outputs now
        total, terms = self._eager_step(images, target, kd_weight)
        return _clone(total, terms) if self.inductor_graphs else (total, terms)

    def _eager_step(self, images: Tensor, target: Tensor, kd_weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        total, terms = self._forward_loss_fast(images, target, kd_weight)
        # once a graph is captured its gradients are tensors of the graph's pool: zero them, never drop them
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self._optimizer_step()
        return total, terms

    def _graphed_step(self, images: Tensor, target: Tensor, kd_weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.graph is None and self._warmup_left > 0:
            self._warmup_left -= 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                total, terms = self._eager_step(images, target, kd_weight)
                out = _clone(total, terms)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self.graph is None:
            self._capture(images, target, kd_weight)
        else:
            for static, value in zip(self._static, (images, target, kd_weight)):
                static.copy_(value, non_blocking=True)
        self.graph.replay()
        return _clone(*self._static_out)

    def _capture(self, images: Tensor, target: Tensor, kd_weight: Tensor) -> None:
        """Record forward, loss, backward and the optimizer step into one graph; the batch in the static inputs is
        the first one the graph trains on (a capture runs nothing)."""
        self._static = (images.clone(), target.clone(), kd_weight.clone())  # clone keeps the memory format
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in its pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may keep calling CUDA while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            total, terms = self._forward_loss_fast(*self._static)
            total.backward()
            self._optimizer_step()
        self._static_out = (total, terms)
        self.graph = graph


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
    ``lr_as_tensor``: the learning rate as a 0-dim tensor on ``device`` (for --cuda-graphs: the captured optimizer
    step reads the lr the scheduler writes in place, instead of a Python float baked into the graph).
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
