"""okdfast.run.step: one meaning per flag (--compile's modes, --cuda-graphs and their combination) and the refusals; the
CUDA-graph step itself needs a GPU (tests/test_engine_gpu.py, pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from okdfast.config import TrainConfig
from okdfast.methods import MethodConfig, create_method
from okdfast.run.assemble import build_training
from okdfast.run.step import INDUCTOR_GRAPH_MODES, TrainStep, resolve_compile_mode
from okdfast.utils.distributed import DistInfo


@pytest.mark.parametrize(
    ("compile_mode", "cuda_graphs", "expected"),
    [
        ("off", False, None),
        ("default", False, "default"),
        ("max-autotune", False, "max-autotune"),  # Inductor's own CUDA graphs on
        ("reduce-overhead", False, "reduce-overhead"),
        ("off", True, None),  # okdfast's step graph around eager kernels
        ("default", True, "default"),
        ("max-autotune", True, "max-autotune-no-cudagraphs"),  # --cuda-graphs wins: autotuned kernels, one graph
        ("reduce-overhead", True, "default"),  # its only addition, CUDA graphs, is what okdfast's graph does
    ],
)
def test_compile_mode_and_cuda_graphs_resolve_to_one_meaning(compile_mode, cuda_graphs, expected):
    resolved = resolve_compile_mode(compile_mode, cuda_graphs)
    assert resolved == expected
    assert not (cuda_graphs and resolved in INDUCTOR_GRAPH_MODES), "no Inductor graph inside okdfast's graph"


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile_mode='fast'"):
        resolve_compile_mode("fast", False)


def _step(**settings) -> TrainStep:
    """The MDE step as okdfast.train builds it (okdfast.run.assemble.build_training) from a config with
    ``settings``."""
    config = TrainConfig(method="mde", arch="resnet8", branches=3, device="cpu", **settings).resolve_speed_defaults(
        "cpu"
    )
    method = create_method("mde", "resnet8", 10, MethodConfig(num_branches=3))
    return build_training(config, method, method, None, DistInfo(), torch.device("cpu"))[3]


def test_cuda_graphs_are_refused_on_the_cpu():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        _step(cuda_graphs=True)


def test_inductor_graph_modes_only_count_on_cuda():
    step = _step(compile="reduce-overhead")
    assert step.compiled and not step.inductor_graphs  # CPU: Inductor has no CUDA graphs to replay
    assert step.describe() == "compile reduce-overhead"
    assert _step().describe() == "eager"


def test_eager_step_trains():
    torch.manual_seed(0)
    step = _step(batch_size=4)
    before = [p.detach().clone() for p in step.method.parameters()]
    total, terms = step(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]), torch.tensor(1.0))
    assert torch.isfinite(total) and {"ce", "kd"} <= set(terms)
    assert any(not torch.equal(a, b) for a, b in zip(before, step.method.parameters()))
    assert step.graph is None
