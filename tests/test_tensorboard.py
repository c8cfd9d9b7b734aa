"""--tensorboard: the event files hold every metric, loss term, the lr and images/s, read back with TensorBoard's
own EventAccumulator; a resumed run does not log an epoch twice; a missing tensorboard gives a one-line hint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from okdfast.config import TrainConfig, parse_config  # noqa: E402
from okdfast.train import run  # noqa: E402
from okdfast.utils import tensorboard as tb  # noqa: E402


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_writer_groups_every_numeric_column(tmp_path):
    writer = tb.TensorBoardWriter(tmp_path)
    rows = [
        {"epoch": e, "partial": False, "lr": 0.1 / (e + 1), "train_loss": 2.0 - e, "train_cd": 0.01, "acc_leader": 50.0}
        | {"images_per_sec": 1000.0 + e, "test_ce_ensemble": 1.5}
        for e in range(3)
    ]
    for row in rows:
        writer.log_epoch(row)
    writer.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {
        "opt/lr",
        "train/loss",
        "train/cd",
        "test/acc_leader",
        "speed/images_per_sec",
        "test/ce_ensemble",
    }
    assert scalars["opt/lr"] == [(0, pytest.approx(0.1)), (1, pytest.approx(0.05)), (2, pytest.approx(0.1 / 3))]
    assert [step for step, _ in scalars["train/loss"]] == [0, 1, 2]


def quick(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(
        method="one", arch="resnet8", dataset="synthetic", subset=128, batch_size=64, epochs=2, workers=0,
        progress="off", tensorboard=True, lr_schedule="cosine", out=str(tmp_path / "run"),
    )  # fmt: skip
    values.update(overrides)
    config = TrainConfig(**values)
    config.validate()
    return config


def test_training_run_logs_every_metric_loss_term_lr_and_speed(tmp_path):
    summary = run(quick(tmp_path))
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    expected = {"train/loss", "train/ce", "train/kd", "train/teacher_ce", "opt/lr", "opt/kd_weight"}
    expected |= {"speed/images_per_sec", "speed/epoch_seconds", "test/acc_branch_mean", "test/acc_ensemble"}
    expected |= {f"test/acc_branch_{k}" for k in range(3)} | {"test/acc_gate", "test/diversity_kl", "test/disagreement"}
    assert expected <= set(scalars), expected - set(scalars)
    for tag in expected:
        assert [step for step, _ in scalars[tag]] == [0, 1], tag
    # the cosine schedule: lr 0.1 at epoch 0, 0.1 * (1 + cos(pi / 2)) / 2 = 0.05 at epoch 1
    assert [value for _, value in scalars["opt/lr"]] == [pytest.approx(0.1), pytest.approx(0.05)]
    last = summary["last"]
    assert scalars["test/acc_branch_mean"][-1][1] == pytest.approx(last["acc_branch_mean"], rel=1e-6)
    assert scalars["train/ce"][-1][1] == pytest.approx(last["train_ce"], rel=1e-6)


def test_resumed_run_logs_each_epoch_once(tmp_path):
    first = run(quick(tmp_path, max_steps=3))  # epoch 0 done, epoch 1 cut after 1 of its 2 steps (logged partial)
    assert not first["finished"]
    run(quick(tmp_path, resume="auto"))
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert [step for step, _ in scalars["test/acc_branch_mean"]] == [0, 1]
    assert [step for step, _ in scalars["opt/lr"]] == [0, 1]


def test_missing_tensorboard_gives_a_one_line_install_hint(monkeypatch, capsys):
    monkeypatch.setattr(tb, "tensorboard_available", lambda: False)
    with pytest.raises(SystemExit) as error:
        parse_config(["--dataset", "synthetic", "--tensorboard"])
    assert error.value.code == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import itself fails
    with pytest.raises(ImportError, match="pip install tensorboard"):
        tb.TensorBoardWriter("unused")
