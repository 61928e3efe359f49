"""The README's Python examples run as written (the image-ViT state_dict
placeholder is filled with a randomly initialised torchvision vit_b_16)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_has_examples():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("index", [0, 1, 2])
def test_readme_example_runs(index):
    code = _blocks()[index]
    if "image_vit_state_dict" in code:
        torchvision = pytest.importorskip("torchvision")
        code = code.replace("image_vit_state_dict", "_vit_state_dict")
        env = {"_vit_state_dict": torchvision.models.vit_b_16().state_dict()}
    else:
        env = {}
    exec(compile("import torch\n" + code, f"README.md block {index}", "exec"), env)
