"""Branch-batched execution (``--branch-impl grouped``): the K branches of a multi-branch network run as one.

Inside the grouped branches every tensor is *branch-stacked*: (B, K * C, H, W), branch k's C channels at
``[k * C, (k + 1) * C)``. On that layout

- a convolution is one ``conv2d(groups=K)`` (:class:`GroupedConv2d`, weight (K * Cout, Cin, kh, kw)); the first
  ones, which read the trunk output (B, Ct, H, W) every branch shares, are one dense conv with K * Cout outputs
  (the input is read once, not K times);
- BatchNorm is a plain ``BatchNorm2d(K * C)``: its statistics are per channel, hence per branch, and DDP's
  SyncBatchNorm conversion (okdfast/utils/sync_batchnorm.py) keeps them per channel;
- ReLU, pooling, dropout and the residual adds are elementwise or per channel and run as they are;
- a dense layer's concat is per branch (:func:`okdfast.models.parts.cat_branches`);
- the classifier (and VGG's MLP head) is one batched matmul (:class:`GroupedLinear`, weight (K, Dout, Din)), so
  the (B, K, C) logits and the (B, K, D) pooled features come out by a view.

DML's K whole networks are grouped the same way from their first layer (the images are the shared input).

The grouped modules are built from the loop form's (:func:`group_modules`), so a seed gives the same initial weights
under both impls, and a grouped :class:`~okdfast.models.multibranch.MultiBranchNet` saves and loads the loop form's
state_dict (:func:`split_state` / :func:`join_state`, which it installs as state-dict hooks): a checkpoint written
under one impl loads under the other. (An optimizer's state is indexed by parameter and is not converted: resume
under the impl that wrote the checkpoint.)

Where a block reads its input other than through convolutions (a pre-activation WRN block's BN, a dense layer's
BN and concat, an identity shortcut), the shared input is first copied K times (:func:`expand_branches`): those
branches apply K different BN affines to it, so K copies exist in the loop form too.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okdfast.models.densenet import DenseLayer
from okdfast.models.parts import Branch, GlobalAvgPool, GlobalMaxPool
from okdfast.models.resnet import BasicBlock, Bottleneck
from okdfast.models.wide_resnet import WideBasicBlock

BRANCH_IMPLS = ("auto", "loop", "grouped")

# --branch-impl auto: the archs where grouped runs, per device type (loop elsewhere and on device types not listed).
# The rule: grouped where benchmarks/bench_branches.py measured it >= 1.10x loop at each of K = 2, 4 and 8 (shared
# trunk); smaller differences are within run-to-run noise. CPU (benchmarks/results/branches.csv): none qualifies.
# The BasicBlock ResNets' small gains at batch 8 changed sign at batch 16 and 32; WRN-20-8, VGG-16 (most: oneDNN's
# grouped convs on 2x2 maps) and the DenseNets lose.
# CUDA: not measured yet; the pick until a GPU row replaces it. Grouped for the narrow nets, whose per-branch convs
# (16-64 channels on 8x8 / 16x16 maps; DenseNet's 12-48) are far too small to fill a GPU: that step is bound by
# launches (K convs, K BN and K ReLU launches per layer in the loop form; one of each grouped) and the grouped form
# also reads the trunk output once. Loop for the wide ones (wrn20_8 and wrn20_8_bottleneck at 512 channels per
# branch, VGG's 512): there each conv fills the GPU by itself, and cuDNN's grouped convs with wide groups have
# been reported slower than the same convs run separately (pytorch/pytorch#73764, #70954), so grouping could lose.
# (DenseNet's 12 output channels per group are cuDNN's other weak case; at these sizes launches should dominate.)
AUTO_GROUPED: dict[str, frozenset[str]] = {
    "cpu": frozenset(),
    "cuda": frozenset(
        {"resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet110_bottleneck"}
        | {"densenet40_12", "densenet40_12_bc"}
    ),
}


def resolve_branch_impl(impl: str, arch: str, device_type: str | None = None, num_branches: int = 2) -> str:
    """'loop' or 'grouped' for ``impl`` ('auto' | 'loop' | 'grouped') on ``device_type`` ('cpu', 'cuda', ...).

    'auto' picks grouped where :data:`AUTO_GROUPED` lists the arch for the device type (loop on device types not
    listed); ``device_type=None`` means where the net will most likely run: CUDA when available, else the CPU.
    K = 1 has nothing to batch and always runs the loop form.
    """
    if impl not in BRANCH_IMPLS:
        raise ValueError(f"branch_impl={impl!r}: use one of {', '.join(BRANCH_IMPLS)}")
    if num_branches == 1:
        return "loop"
    if impl != "auto":
        return impl
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return "grouped" if arch in AUTO_GROUPED.get(device_type, frozenset()) else "loop"


class GroupedConv2d(nn.Conv2d):
    """K same-shape convolutions as one; weight (K * Cout, Cin, kh, kw), branch k's filters at rows k * Cout.

    ``forward`` takes the branch-stacked input (B, K * Cin, H, W) -> one conv with groups=K; or the input every
    branch shares (B, Cin, H, W) -> one dense conv with K * Cout outputs. Either way (B, K * Cout, H', W').
    """

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        first = convs[0]
        for conv in convs:
            if conv.groups != 1 or conv.padding_mode != "zeros":
                raise ValueError(f"{conv}: only groups=1, padding_mode='zeros' convolutions can be grouped")
            if (conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.bias is None) != (
                first.weight.shape,
                first.stride,
                first.padding,
                first.dilation,
                first.bias is None,
            ):
                raise ValueError(f"cannot group different convolutions: {first} and {conv}")
        k = len(convs)
        super().__init__(
            k * first.in_channels,
            k * first.out_channels,
            first.kernel_size,
            first.stride,
            first.padding,
            first.dilation,
            groups=k,
            bias=first.bias is not None,
            device="meta",  # the parameters are the K convs' own, set below
        )
        self.num_branches = k
        self.weight = nn.Parameter(torch.cat([c.weight.detach() for c in convs]), first.weight.requires_grad)
        if first.bias is not None:
            self.bias = nn.Parameter(torch.cat([c.bias.detach() for c in convs]), first.bias.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == self.in_channels // self.num_branches and self.num_branches > 1:  # the shared input
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, 1)
        return self._conv_forward(x, self.weight, self.bias)


class GroupedLinear(nn.Module):
    """K same-shape ``nn.Linear`` as one batched matmul: (B, K * Din) -> (B, K * Dout); weight (K, Dout, Din)."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        first = linears[0]
        if any(lin.weight.shape != first.weight.shape or (lin.bias is None) != (first.bias is None) for lin in linears):
            raise ValueError(f"cannot group different linear layers: {[str(lin) for lin in linears]}")
        self.num_branches = len(linears)
        self.in_features, self.out_features = first.in_features, first.out_features
        self.weight = nn.Parameter(torch.stack([lin.weight.detach() for lin in linears]), first.weight.requires_grad)
        self.bias = (
            nn.Parameter(torch.stack([lin.bias.detach() for lin in linears]), first.bias.requires_grad)
            if first.bias is not None
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.einsum("bki,koi->bko", x.unflatten(1, (self.num_branches, self.in_features)), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.flatten(1)

    def extra_repr(self) -> str:
        return (
            f"num_branches={self.num_branches}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


def _group_batchnorm(bns: Sequence[nn.modules.batchnorm._BatchNorm]) -> nn.modules.batchnorm._BatchNorm:
    """K BatchNorms of C channels -> one of K * C (same class): parameters and running statistics concatenated."""
    first = bns[0]
    settings = (type(first), first.num_features, first.eps, first.momentum, first.affine, first.track_running_stats)
    for bn in bns:
        if (type(bn), bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats) != settings:
            raise ValueError(f"cannot group different BatchNorms: {first} and {bn}")
    grouped = type(first)(
        len(bns) * first.num_features, first.eps, first.momentum, first.affine, first.track_running_stats, device="meta"
    )
    for name, value in chain(first.named_parameters(recurse=False), first.named_buffers(recurse=False)):
        if value.dim() == 0:  # num_batches_tracked: every branch saw the same batches
            joined = value.detach().clone()
        else:
            joined = torch.cat([getattr(bn, name).detach() for bn in bns])
        if isinstance(value, nn.Parameter):
            setattr(grouped, name, nn.Parameter(joined, value.requires_grad))
        else:
            setattr(grouped, name, joined)
    grouped.train(first.training)
    return grouped


# How each module type groups: leaves with state are replaced, stateless ones copied, containers (whose forward is
# elementwise or per channel given their children) rebuilt around grouped children. Anything else is refused, so a
# new block type cannot be grouped wrongly by accident.
_STATELESS = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity, GlobalAvgPool, GlobalMaxPool)
_CONTAINERS = (nn.Sequential, Branch, BasicBlock, Bottleneck, WideBasicBlock, DenseLayer)


def group_modules(modules: Sequence[nn.Module]) -> nn.Module:
    """K modules of the same structure (K branches, or K trunks) -> one module on branch-stacked tensors.

    The originals are left untouched; the result owns copies of their parameters and buffers.
    """
    first = modules[0]
    kind = type(first)
    if any(type(m) is not kind for m in modules):
        raise ValueError(f"cannot group modules of different types: {sorted({type(m).__name__ for m in modules})}")
    if kind is nn.Conv2d:
        return GroupedConv2d(modules)  # type: ignore[arg-type]
    if kind is nn.Linear:
        return GroupedLinear(modules)  # type: ignore[arg-type]
    if isinstance(first, nn.modules.batchnorm._BatchNorm):
        return _group_batchnorm(modules)  # type: ignore[arg-type]
    if kind in _STATELESS:
        return copy.deepcopy(first)
    if kind not in _CONTAINERS:
        raise TypeError(f"{kind.__name__} cannot be grouped: teach okdfast/models/grouped.py how (group_modules)")
    if first._parameters or first._buffers:
        raise TypeError(f"{kind.__name__} holds parameters or buffers of its own: it cannot be grouped as a container")
    names = list(first._modules)
    if any(list(m._modules) != names for m in modules):
        raise ValueError(f"cannot group {kind.__name__}s of different structure")
    grouped = copy.copy(first)  # the same class and plain attributes (strides, flags), fresh containers below
    for attr, value in vars(first).items():
        if isinstance(value, (dict, set)):
            grouped.__dict__[attr] = copy.copy(value)
    for name in names:
        grouped._modules[name] = group_modules([m._modules[name] for m in modules])
    if isinstance(grouped, DenseLayer):
        grouped.num_branches = len(modules)
    return grouped


def _first_reader(module: nn.Module) -> nn.Module:
    """The module that reads ``module``'s input first: down the first child of the containers."""
    while isinstance(module, (nn.Sequential, Branch)) and len(module._modules):
        module = next(iter(module.children()))
    return module


def reads_shared_input(grouped: nn.Module) -> bool:
    """Whether ``grouped`` reads its input only through convolutions, so that it can take the (B, C, H, W) input
    every branch shares as it is (one dense conv with K * Cout outputs); else it needs :func:`expand_branches`."""
    first = _first_reader(grouped)
    if isinstance(first, nn.Conv2d):
        return True
    if isinstance(first, (BasicBlock, Bottleneck)):  # conv1 and the projection shortcut read x; identity does not
        return not isinstance(first.shortcut, nn.Identity)
    return False  # BN-first blocks (WRN, DenseNet): K BN affines of one input


def expand_branches(x: Tensor, num_branches: int) -> Tensor:
    """(B, C, H, W) shared by every branch -> (B, K * C, H, W) branch-stacked (K copies; memory format kept)."""
    return torch.cat([x] * num_branches, 1)


# ------------------------------------------------------------------------------------------------- state_dict form
def _layouts(grouped: nn.Module) -> dict[str, str]:
    """How each saved tensor of ``grouped`` holds the K loop tensors: 'cat' (dim 0), 'stack' or 'copy' (a 0-dim
    count every branch shares), by its name under ``grouped``."""
    layouts = {}
    for module_name, module in grouped.named_modules():
        tensors = chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name, value in tensors:
            if name in module._non_persistent_buffers_set:
                continue
            layout = "stack" if isinstance(module, GroupedLinear) else "copy" if value.dim() == 0 else "cat"
            layouts[f"{module_name}.{name}" if module_name else name] = layout
    return layouts


def _rename_metadata(state_dict: dict, root: str, num_branches: int, to_loop: bool) -> None:
    """Re-key the per-module version metadata saved with ``state_dict`` for the module tree at ``root``: the grouped
    form's ``root.<path>`` <-> the loop form's ``root.<k>.<path>`` (loop -> grouped keeps branch 0's entries)."""
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None or root not in metadata:
        return
    items = list(metadata.items())
    inside = {key for key, _ in items if key == root or key.startswith(root + ".")}
    subtree = {key[len(root) + 1 :]: value for key, value in items if key in inside}  # '' is root itself
    if to_loop:
        renamed = [(root, subtree[""])]
        for k in range(num_branches):
            renamed += [(f"{root}.{k}" + (f".{path}" if path else ""), value) for path, value in subtree.items()]
    else:
        renamed = [(root, subtree.get("0", subtree[""]))]
        renamed += [(f"{root}.{path[2:]}", value) for path, value in subtree.items() if path.startswith("0.")]
    first = next(i for i, (key, _) in enumerate(items) if key in inside)
    metadata.clear()
    metadata.update(items[:first] + renamed + [item for item in items[first:] if item[0] not in inside])


def split_state(state_dict: dict, prefix: str, grouped: nn.Module, num_branches: int) -> None:
    """In place: the entries ``prefix.<name>`` of the grouped module -> the loop form's ``prefix.<k>.<name>``.

    The values are views of the grouped tensors (as the loop form's are detached aliases of its parameters).
    """
    layouts = _layouts(grouped)
    taken = {name: state_dict.pop(f"{prefix}.{name}") for name in layouts if f"{prefix}.{name}" in state_dict}
    for k in range(num_branches):
        for name, value in taken.items():
            layout = layouts[name]
            part = value if layout == "copy" else value[k] if layout == "stack" else value.chunk(num_branches)[k]
            state_dict[f"{prefix}.{k}.{name}"] = part
    _rename_metadata(state_dict, prefix, num_branches, to_loop=True)


def join_state(state_dict: dict, prefix: str, grouped: nn.Module, num_branches: int) -> None:
    """In place: the loop form's entries ``prefix.<k>.<name>`` -> the grouped module's ``prefix.<name>``.

    Names present for only some branches are left as they are, so that ``load_state_dict`` reports them.
    """
    for name, layout in _layouts(grouped).items():
        keys = [f"{prefix}.{k}.{name}" for k in range(num_branches)]
        if not all(key in state_dict for key in keys):
            continue
        parts = [state_dict.pop(key) for key in keys]
        joined = parts[0] if layout == "copy" else torch.stack(parts) if layout == "stack" else torch.cat(parts)
        state_dict[f"{prefix}.{name}"] = joined
    _rename_metadata(state_dict, prefix, num_branches, to_loop=False)
