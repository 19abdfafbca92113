"""Golden files: .sqz files written by earlier versions must always decode to exactly the same tensors."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sqz

GOLDEN = sorted((Path(__file__).parent / "golden").glob("v*/*.sqz"))


def test_there_are_golden_files_for_this_major():
    assert any(p.parent.name == f"v{sqz.__version__.split('.')[0]}.0" for p in GOLDEN)


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_file_decodes_exactly(path):
    expected = load_file(str(path.with_suffix(".expected.safetensors")))
    adapter = sqz.load(path)
    names = [n for n in expected if not n.startswith("delta::")]
    assert sorted(adapter) == sorted(names)
    for name in names:
        assert adapter[name].dtype == expected[name].dtype and torch.equal(adapter[name], expected[name]), name
    for pair in adapter.pairs:
        assert torch.equal(adapter.delta(pair.module), expected[f"delta::{pair.module}"]), pair.module
