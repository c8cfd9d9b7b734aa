"""The README's promises: three commands near the top, and its Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_three_commands_near_the_top():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ['pip install -e ".[dev]"', "python -m okdfast.train --epochs 300 --amp", "python -m pytest -q"]


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README shows the loss API in a python block"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        loss, cd = namespace["loss"], namespace["cd"]
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert cd.ndim == 0 and torch.isfinite(cd)
        assert namespace["logits"].grad is not None and torch.isfinite(namespace["logits"].grad).all()
        if "ffm" in namespace:  # the plain MDE loop trained the FFM through the head's loss
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in namespace["ffm"].parameters())
