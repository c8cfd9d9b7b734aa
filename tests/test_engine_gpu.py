"""The speed features on CUDA (``-m gpu``; skipped without a CUDA device): CUDA graphs against the eager step,
including the last partial batch, and a short all-features-on training run that must learn.

The CPU tier covers compile, bf16 autocast, DDP and the NaN guard (tests/test_engine.py); what only a GPU can run
lives here and runs in ``benchmarks/gpu_suite.sh``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from okdfast.config import TrainConfig
from okdfast.methods import MethodConfig, create_method
from okdfast.run.assemble import build_training
from okdfast.run.step import TrainStep
from okdfast.train import run
from okdfast.utils.distributed import DistInfo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _step(method, *, cuda_graphs: bool, full_batch: int) -> TrainStep:
    """The step as okdfast.train builds it (okdfast.run.assemble.build_training), at lr 0.05."""
    config = TrainConfig(
        method="mde",
        arch="resnet8",
        branches=3,
        lr=0.05,
        batch_size=full_batch,
        compile="default" if cuda_graphs else "off",
        cuda_graphs=cuda_graphs,
        device="cuda",
    )
    return build_training(config, method, method, None, DistInfo(), torch.device("cuda"))[3]


def test_cuda_graph_step_matches_the_eager_step_including_a_partial_batch():
    torch.manual_seed(0)
    device = torch.device("cuda")
    eager_method = create_method("mde", "resnet8", 10, MethodConfig(num_branches=3)).to(device)
    graph_method = copy.deepcopy(eager_method)
    eager = _step(eager_method, cuda_graphs=False, full_batch=16)
    graphed = _step(graph_method, cuda_graphs=True, full_batch=16)
    kd_weight = torch.tensor(1.0, device=device)
    generator = torch.Generator().manual_seed(1)
    sizes = [16, 16, 16, 16, 10, 16, 16]  # a partial batch in the middle, as at an epoch's end
    for size in sizes:
        images = torch.randn(size, 3, 32, 32, generator=generator).to(device)
        target = torch.randint(0, 10, (size,), generator=generator).to(device)
        loss_eager, _ = eager(images, target, kd_weight)
        loss_graph, terms = graphed(images, target, kd_weight)
        assert torch.isfinite(loss_graph)
        torch.testing.assert_close(loss_graph, loss_eager, rtol=2e-3, atol=2e-3)
        assert set(terms) >= {"ce", "kd"}
    for (name, p_eager), p_graph in zip(eager_method.named_parameters(), graph_method.parameters()):
        torch.testing.assert_close(p_graph, p_eager, rtol=5e-3, atol=5e-3, msg=name)


def test_all_speed_features_on_train_and_learn(tmp_path: Path):
    # 3000 images in batches of 64: 46 full batches and one of 56 per epoch (the partial batch runs un-graphed);
    # cosine lr changes every epoch (the graphed optimizer step reads the lr tensor, no recompile).
    config = TrainConfig(
        method="mde",
        arch="resnet8",
        dataset="synthetic",
        subset=3000,
        epochs=4,
        batch_size=64,
        eval_batch_size=500,
        lr_schedule="cosine",
        loader="gpu",
        amp="bf16",
        compile="default",
        channels_last=True,
        cuda_graphs=True,
        fused_loss="on",
        progress="off",
        out=str(tmp_path / "run"),
    )
    config.validate()
    summary = run(config)
    assert summary["finished"] and summary["epochs_done"] == 4
    assert summary["global_step"] == 4 * 47
    assert summary["last"]["acc_branch_mean"] > 50.0, summary["last"]
    assert summary["last"]["acc_ensemble"] > 50.0, summary["last"]
