"""okdfast.models: registry, backbones in trunk + branch form, the multi-branch wrapper (CPU, fast)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from okdfast.models import (
    ArchParts,
    Branch,
    BranchOutput,
    MultiBranchNet,
    create_arch,
    create_model,
    list_models,
    register_model,
)

ALL_ARCHS = list_models()
HEAVY = {"wrn20_8", "wrn20_8_bottleneck", "vgg16", "vgg16_mlp"}  # > 5M parameters per network: fewer K in forwards
B = 2


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def images(batch: int = B) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------------
# Closed-form parameter counts, written from the papers' architecture tables, not from the module code.


def resnet_basic_params(n: int, c: int, option_b: bool = True) -> int:
    """CIFAR ResNet-(6n+2), widths 16/32/64, BasicBlock.

    stem 3*16*9 + 2*16 = 464; stage 1: n(18*16^2 + 4*16) = 4672n; stage 2: 9*16*32 + 9*32^2 + 4*32 +
    (n-1)(18*32^2 + 4*32) = 18560n - 4560; stage 3: 73984n - 18432; fc 64c + c. Option B adds the two
    projection shortcuts 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
    """
    return 97216 * n - 22576 + 65 * c + (2752 if option_b else 0)


def resnet_bottleneck_params(n: int, c: int, width_mult: int = 1) -> int:
    """CIFAR ResNet-(9n+2) with bottlenecks (planes 16/32/64, inner width planes*width_mult, out 4*planes), option B."""
    total, cin = 3 * 16 * 9 + 2 * 16, 16
    for planes in (16, 32, 64):
        w, out = planes * width_mult, 4 * planes
        for b in range(n):
            i = cin if b == 0 else out
            total += i * w + 2 * w + 9 * w * w + 2 * w + w * out + 2 * out
            if i != out:
                total += i * out + 2 * out
        cin = out
    return total + 4 * 64 * c + c


def wrn_params(n: int, k: int, c: int) -> int:
    """Pre-activation WRN, n blocks per stage, widths 16k/32k/64k; projection 1x1 conv (no bias) where shape changes."""
    total, cin = 3 * 16 * 9, 16
    for w in (16 * k, 32 * k, 64 * k):
        for b in range(n):
            i = cin if b == 0 else w
            total += 2 * i + 9 * i * w + 2 * w + 9 * w * w + (i * w if i != w else 0)
        cin = w
    return total + 2 * 64 * k + 64 * k * c + c


def densenet_params(
    layers: int, growth: int, c: int, init: int = 24, bottleneck: bool = False, compression: float = 1.0
) -> int:
    total, ch = 3 * init * 9, init
    for block in range(3):
        for _ in range(layers):
            if bottleneck:
                total += 2 * ch + ch * 4 * growth + 2 * 4 * growth + 9 * 4 * growth * growth
            else:
                total += 2 * ch + 9 * ch * growth
            ch += growth
        if block < 2:
            out = int(ch * compression)
            total += 2 * ch + ch * out
            ch = out
    return total + 2 * ch + ch * c + c


VGG16_CFG = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def vgg16_conv_params() -> int:
    """3x3 conv weights + biases of VGG-16's 13 convs: the well-known 14,714,688."""
    total, cin = 0, 3
    for w in VGG16_CFG:
        total += 9 * cin * w + w
        cin = w
    return total


def vgg16_params(c: int, mlp: bool = False) -> int:
    bn = 2 * sum(VGG16_CFG)
    head = (512 * 512 + 512) * 2 + 512 * c + c if mlp else 512 * c + c
    return vgg16_conv_params() + bn + head


EXPECTED = {
    "resnet8": lambda c: resnet_basic_params(1, c),
    "resnet20": lambda c: resnet_basic_params(3, c),
    "resnet32": lambda c: resnet_basic_params(5, c),
    "resnet56": lambda c: resnet_basic_params(9, c),
    "resnet110": lambda c: resnet_basic_params(18, c),
    "resnet110_bottleneck": lambda c: resnet_bottleneck_params(12, c),
    "wrn20_8": lambda c: wrn_params(3, 8, c),
    "wrn20_8_bottleneck": lambda c: resnet_bottleneck_params(2, c, width_mult=8),
    "vgg16": lambda c: vgg16_params(c),
    "vgg16_mlp": lambda c: vgg16_params(c, mlp=True),
    "densenet40_12": lambda c: densenet_params(12, 12, c),
    "densenet40_12_bc": lambda c: densenet_params(6, 12, c, bottleneck=True, compression=0.5),
}


def test_every_registered_arch_has_an_expected_count():
    assert set(EXPECTED) == set(ALL_ARCHS)


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_single_network_param_count(arch, num_classes):
    with torch.device("meta"):
        net = create_model(arch, num_classes, num_branches=1)
    assert n_params(net) == EXPECTED[arch](num_classes)


@pytest.mark.parametrize(
    "n, published",
    [(3, 0.27e6), (5, 0.46e6), (9, 0.85e6), (18, 1.7e6)],  # He et al. 2016, Table 6 (option A, CIFAR-10)
)
def test_resnet_counts_match_he_et_al(n, published):
    option_a = resnet_basic_params(n, 10, option_b=False)
    digits = 1 if published >= 1e6 else 2
    assert round(option_a / 1e6, digits) == published / 1e6
    assert resnet_basic_params(n, 10) - option_a == 2752  # what our option-B shortcuts add


def test_published_counts_vgg16_densenet40():
    assert vgg16_conv_params() == 14_714_688
    with torch.device("meta"):
        vgg = create_model("vgg16", 10, num_branches=1)
    conv = sum(n_params(m) for m in vgg.modules() if isinstance(m, nn.Conv2d))
    assert conv == 14_714_688
    # Huang et al. 2017, Table 2: DenseNet (k = 12), depth 40: 1.0M.
    assert abs(densenet_params(12, 12, 10) - 1.0e6) / 1.0e6 < 0.08


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_multibranch_param_counts(arch):
    k, c = 3, 100
    with torch.device("meta"):
        parts = create_arch(arch, c)
        trunk, branch = n_params(parts.trunk), n_params(parts.make_branch())
        shared = create_model(arch, c, num_branches=k)
        unshared = create_model(arch, c, num_branches=k, shared_trunk=False)
    single = EXPECTED[arch](c)
    assert trunk + branch == single
    assert n_params(shared) == trunk + k * branch
    assert n_params(unshared) == k * single
    # every branch (and every unshared trunk) owns its parameters: nothing is shared between them
    for net in (shared, unshared):
        owners = [{id(p) for p in b.parameters()} for b in net.branches]
        if net.trunks is not None:
            owners += [{id(p) for p in t.parameters()} for t in net.trunks]
        assert sum(len(s) for s in owners) == len(set().union(*owners))


# ----------------------------------------------------------------------------------------------------------------
# Shapes


def _ks(arch: str, shared: bool) -> list[int]:
    if arch in HEAVY:
        return [2, 5] if shared else [2, 3]  # K whole WRN-20-8s / VGG-16s are slow to build and run on CPU
    return [2, 3, 4, 5]


SHAPE_CASES = [(a, k, s) for a in ALL_ARCHS for s in (True, False) for k in _ks(a, s)]


@pytest.mark.parametrize(
    "arch, k, shared", SHAPE_CASES, ids=[f"{a}-K{k}-{'shared' if s else 'dml'}" for a, k, s in SHAPE_CASES]
)
def test_output_shapes(arch, k, shared):
    c = 7
    net = create_model(arch, c, num_branches=k, shared_trunk=shared)
    with torch.no_grad():
        out = net(images())
    assert isinstance(out, BranchOutput)
    assert out.logits.shape == (B, k, c)
    assert out.pooled.shape == (B, k, net.feature_channels)
    if shared:
        assert out.trunk is not None and out.trunk.shape[:2] == (B, net.trunk_channels)
        assert net.trunks is None and len(net.branches) == k
    else:
        assert out.trunk is None and net.trunk is None and len(net.trunks) == k
    assert net.classifier_weights().shape == (k, c, net.branches[0].classifier.in_features)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_arch_parts_metadata(arch):
    with torch.device("meta"):
        parts = create_arch(arch, 10)
        branch = parts.make_branch()
    assert isinstance(parts, ArchParts) and isinstance(branch, Branch)
    assert isinstance(branch.classifier, nn.Linear) and branch.classifier.out_features == 10
    expected = {  # (trunk_channels, feature_channels, feature_size)
        "resnet8": (32, 64, 8),
        "resnet20": (32, 64, 8),
        "resnet32": (32, 64, 8),
        "resnet56": (32, 64, 8),
        "resnet110": (32, 64, 8),
        "resnet110_bottleneck": (128, 256, 8),
        "wrn20_8": (256, 512, 8),
        "wrn20_8_bottleneck": (128, 256, 8),
        "vgg16": (512, 512, 2),
        "vgg16_mlp": (512, 512, 2),
        "densenet40_12": (312, 456, 8),
        "densenet40_12_bc": (60, 132, 8),
    }
    assert (parts.trunk_channels, parts.feature_channels, parts.feature_size) == expected[arch]


@pytest.mark.parametrize(
    "module, constant, value, arch, trunk_channels",
    [
        ("resnet", "SHARED_STAGES", 1, "resnet8", 16),
        ("wide_resnet", "SHARED_STAGES", 1, "wrn20_8", 128),
        ("vgg", "SHARED_STAGES", 3, "vgg16", 256),
        ("densenet", "SHARED_BLOCKS", 1, "densenet40_12_bc", 48),
    ],
)
def test_split_is_one_constant(monkeypatch, module, constant, value, arch, trunk_channels):
    import importlib

    mod = importlib.import_module(f"okdfast.models.{module}")
    monkeypatch.setattr(mod, constant, value)
    net = create_model(arch, 10, num_branches=2)
    assert net.trunk_channels == trunk_channels
    assert n_params(create_model(arch, 10, num_branches=1)) == EXPECTED[arch](10)
    with torch.no_grad():
        out = net(images())
    assert out.trunk.shape[1] == trunk_channels
    assert out.pooled.shape == (B, 2, net.feature_channels)


def test_single_network_is_k1():
    net = create_model("resnet8", 10, num_branches=1)
    out = net(images())
    assert out.logits.shape == (B, 1, 10) and out.pooled.shape == (B, 1, 64)
    assert create_model("resnet8", 10).num_branches == 3


def test_pooled_feature_is_what_the_head_reads():
    net = create_model("vgg16_mlp", 5, num_branches=2).eval()
    net_d = create_model("densenet40_12_bc", 5, num_branches=2).eval()
    for m in (net, net_d):
        with torch.no_grad():
            out = m(images())
            for k, branch in enumerate(m.branches):
                torch.testing.assert_close(branch.classifier(branch.head(out.pooled[:, k])), out.logits[:, k])


# ----------------------------------------------------------------------------------------------------------------
# Independence of the branches


@pytest.mark.parametrize("arch", ["resnet8", "densenet40_12_bc", "wrn20_8_bottleneck"])
def test_branches_initialised_differently(arch):
    net = create_model(arch, 10, num_branches=3)
    flat = [torch.cat([p.flatten() for p in b.parameters() if p.dim() > 1]) for b in net.branches]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(flat[i], flat[j])
    dml = create_model(arch, 10, num_branches=2, shared_trunk=False)
    t0, t1 = ([p for p in t.parameters() if p.dim() > 1][0] for t in dml.trunks)
    assert not torch.equal(t0, t1)


def _grads_touched(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_gradient_isolation_shared_trunk():
    torch.manual_seed(0)
    k = 3
    net = create_model("resnet8", 10, num_branches=k)
    x = images()
    for target in range(k):
        net.zero_grad(set_to_none=True)
        net(x).logits[:, target].sum().backward()
        for j, branch in enumerate(net.branches):
            assert _grads_touched(branch) == (j == target), (target, j)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.trunk.parameters()), target


def test_gradient_isolation_unshared():
    net = create_model("resnet8", 10, num_branches=3, shared_trunk=False)
    net(images()).logits[:, 1].sum().backward()
    for j in range(3):
        assert _grads_touched(net.trunks[j]) == (j == 1)
        assert _grads_touched(net.branches[j]) == (j == 1)


def test_trunk_grad_scale():
    torch.manual_seed(0)
    net = create_model("resnet8", 10, num_branches=3).eval()  # eval: BN running stats, two identical passes
    x = images()

    def grads(scale: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        net.zero_grad(set_to_none=True)
        net.trunk_grad_scale = scale
        out = net(x)
        (out.logits.square().sum() + out.trunk.mean()).backward()  # the trunk output's reader is scaled too
        return [p.grad.clone() for p in net.trunk.parameters()], [p.grad.clone() for p in net.branches.parameters()]

    trunk1, branch1 = grads(1.0)
    trunk3, branch3 = grads(1 / 3)
    for a, b in zip(trunk1, trunk3):
        torch.testing.assert_close(b, a / 3)
    for a, b in zip(branch1, branch3):
        torch.testing.assert_close(a, b)


def test_classifier_weights_carry_grad():
    net = create_model("resnet8", 10, num_branches=4)
    w = net.classifier_weights()
    assert w.shape == (4, 10, 64) and w.requires_grad
    torch.testing.assert_close(w[2], net.branches[2].classifier.weight)
    w.square().sum().backward()
    for branch in net.branches:
        torch.testing.assert_close(branch.classifier.weight.grad, 2 * branch.classifier.weight.detach())


# ----------------------------------------------------------------------------------------------------------------
# Memory format and compilation


def _calibrate_bn(net: nn.Module, x: torch.Tensor) -> nn.Module:
    # Eval mode with fresh running stats lets untrained activations grow to 1e5 through 40 layers, and train-mode
    # BN over a batch of 2 amplifies fp32 reassociation through 110 layers; so set every BN's running stats to
    # this batch's statistics (one cumulative-average pass) and compare in eval mode (also turns dropout off).
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval()


def _reassociation_bound(net: nn.Module) -> float:
    """How far two fp32 evaluations of ``net`` may differ, relative to the output's largest value, when they differ
    only in the order of their sums (channels-last vs contiguous kernels, AVX2 vs AVX-512 blockings, Winograd vs
    direct convolution): a dot product of n products, summed in another order, moves by at most
    gamma_n = n u sum|terms| (u = 2^-24; Higham, Accuracy and Stability, eq. 3.5), and through a path of L layers
    whose gains are ~1 (BN calibrated on the batch) those relative errors add: L * n_max * u. A layout bug gives
    O(1) errors, 100x or more above this for every architecture."""
    path = [net.trunk, net.branches[0]] if getattr(net, "trunk", None) is not None else [net]
    layers = [m for part in path for m in part.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    fan_in = [
        m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else m.in_features
        for m in layers
    ]
    return len(layers) * max(fan_in) * 2.0**-24


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_channels_last_matches_contiguous(arch):
    torch.manual_seed(0)
    x = images()
    net = _calibrate_bn(create_model(arch, 10, num_branches=2), x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = net(x)
        cl_input = net(x_cl)
        net.to(memory_format=torch.channels_last)
        cl_both = net(x_cl)
    bound = _reassociation_bound(net)  # 3.4e-4 (resnet8) .. 3.9e-3 (resnet110*) .. 9.5e-3 (densenet40_12)
    for out in (cl_input, cl_both):
        for got, want in ((out.logits, ref.logits), (out.pooled, ref.pooled)):
            torch.testing.assert_close(got, want, rtol=0.0, atol=bound * want.abs().max().item())


def test_compiles_without_graph_breaks():
    net = create_model("resnet8", 10, num_branches=3)
    net.trunk_grad_scale = 1 / 3
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = images()
    out = compiled(x)
    out.logits.sum().backward()
    torch.testing.assert_close(out.logits, net(x).logits)


# ----------------------------------------------------------------------------------------------------------------
# Registry and argument validation


def test_registry_lists_and_rejects():
    assert list_models("resnet*") == [
        "resnet110",
        "resnet110_bottleneck",
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet8",
    ]
    assert list_models("nothing*") == []
    with pytest.raises(ValueError, match="unknown model 'resnet33'") as err:
        create_arch("resnet33", 10)
    for name in ALL_ARCHS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet32")(lambda num_classes: None)
    with pytest.raises(ValueError, match="num_classes"):
        create_arch("resnet8", 0)


@pytest.mark.parametrize("k", [0, 9, -1, 2.0, True])
def test_num_branches_validated(k):
    with pytest.raises(ValueError, match=r"num_branches.*1\.\.8"):
        MultiBranchNet("resnet8", 10, k)


def test_unknown_arch_in_create_model():
    with pytest.raises(ValueError, match="known models"):
        create_model("resnet9000", 10)
