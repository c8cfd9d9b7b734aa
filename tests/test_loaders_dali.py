"""``--loader dali`` on the CPU (``device_id=None``): the checks of ``test_loaders.py``, and CINIC-10's PNG files
decoded by DALI. Runs where ``nvidia-dali-cuda130`` is installed (CI installs the extras), skips elsewhere."""

from __future__ import annotations

import pytest

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI: pip install nvidia-dali-cuda130")

from test_loaders import (  # noqa: E402  (after the skip: nothing to import without DALI)
    check_augmentation_statistics,
    check_cinic_end_to_end,
    check_ddp_sharding,
    check_label_alignment_and_reshuffle,
    check_matches_reference,
    check_seed_determinism,
    check_shapes_dtype_and_layout,
    coded_splits,
    make,
    real_splits,
)

from okdfast.data import load_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_shapes_dtype_and_layout(tmp_path):
    check_shapes_dtype_and_layout("dali", tmp_path)


def test_matches_the_torch_reference(tmp_path):
    s = load_dataset("synthetic", train_size=400, test_size=100)
    check_matches_reference("dali", s, tmp_path, channels_last=True)


def test_label_alignment_and_reshuffle(tmp_path):
    check_label_alignment_and_reshuffle("dali", tmp_path)


def test_seed_determinism_and_unfinished_epochs(tmp_path):
    check_seed_determinism("dali", tmp_path)


def test_augmentation_statistics(tmp_path):
    check_augmentation_statistics("dali", tmp_path)


def test_ddp_sharding(tmp_path):
    check_ddp_sharding("dali", tmp_path)


def test_cinic10_png_files_decoded_by_dali(tmp_path):
    check_cinic_end_to_end("dali", tmp_path)  # splits.files present: DALI decodes the PNGs


def test_cinic10_from_the_arrays(tmp_path):
    check_cinic_end_to_end("dali", tmp_path, dali_files=False)


def test_files_asked_for_arrays_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="dali_files=True"):
        make(coded_splits(16), "dali", tmp_path, batch_size=8, dali_files=True)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_real_data_matches_the_reference(name, tmp_path):
    check_matches_reference("dali", real_splits(name), tmp_path, epochs=(0,))
