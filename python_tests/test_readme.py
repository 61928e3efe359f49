"""Every Python block of the README runs exactly as written, in a fresh namespace (nothing is
prepended or replaced). A block that imports an optional package (torchvision) is skipped where
that package is not installed, and a block that puts tensors on "cuda" where no GPU is visible;
only then."""
import ast
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"torch", "tubevit_ext", "numpy"}  # what the library itself depends on


def _blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def _imported_modules(code):
    mods = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def _needs_gpu(code):
    return bool(re.search(r"""device=["']cuda|\.cuda\(\)|torch\.cuda\.(graph|Stream|CUDAGraph)""", code))


def test_readme_has_examples():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs_as_written(index, tmp_path, monkeypatch):
    code = _blocks()[index]
    for mod in sorted(_imported_modules(code) - BASE):
        pytest.importorskip(mod)
    if _needs_gpu(code) and not torch.cuda.is_available():
        pytest.skip("the block runs on a CUDA GPU")
    monkeypatch.chdir(tmp_path)  # a block that writes a file writes it here
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_gpu_blocks_are_told_apart():
    assert _needs_gpu('x = torch.zeros(1, device="cuda")') and _needs_gpu("m = m.cuda().eval()")
    assert not _needs_gpu("x = torch.zeros(1)  # cpu")
    assert [_needs_gpu(b) for b in _blocks()].count(True) == 1  # the CUDA-graph recipe


def test_a_block_missing_an_import_fails():
    # the check this file makes: a block relying on a name it does not import must not pass
    with pytest.raises(NameError, match="torch"):
        exec(compile("x = torch.zeros(1)", "block", "exec"), {"__name__": "__readme__"})
