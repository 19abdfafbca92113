"""Golden files: .sqz files written by earlier versions must always decode to exactly the same tensors."""
from pathlib import Path

import pytest
import torch
from conftest import mixed_tensors
from safetensors.torch import load_file

import sqz
from sqz.constants import READABLE_MAJORS
from sqz.container import Container

GOLDEN = sorted((Path(__file__).parent / "golden").glob("v*/*.sqz"))


def test_there_are_golden_files_for_every_version_up_to_this_one():
    """Each format version checks in its files when it is made (make_golden.py), so old files stay readable."""
    assert {p.parent.name for p in GOLDEN} == {f"v{major}.{minor}" for major, newest in READABLE_MAJORS.items()
                                               for minor in range(newest + 1)}


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_file_decodes_exactly(path, decoder):
    expected = load_file(str(path.with_suffix(".expected.safetensors")))
    adapter = sqz.load(path)
    names = [n for n in expected if not n.startswith("delta::")]
    assert sorted(adapter) == sorted(names)
    for name in names:
        assert adapter[name].dtype == expected[name].dtype and torch.equal(adapter[name], expected[name]), name
    for pair in adapter.pairs:
        assert torch.equal(adapter.delta(pair.module), expected[f"delta::{pair.module}"]), pair.module


def test_the_sampled_fit_still_writes_what_1_1_wrote(tmp_path):
    """`--sample N` is the paper's pipeline, unchanged, and `--format 1.1` still writes 1.1: re-encoding the v1.1
    golden source with the options it was written with (a 64-value sample) gives the same records and data bytes."""
    from safetensors.torch import save_file

    golden = GOLDEN[0].parent.parent / "v1.1" / "b3-auto.sqz"
    src = tmp_path / "source.safetensors"
    save_file(mixed_tensors(), str(src), metadata={"format": "pt", "golden": "yes"})
    sqz.encode(src, tmp_path / "a.sqz", sqz.EncodeOptions(bits=3, sample=64, format="1.1"))
    old, new = Container(golden.read_bytes()), Container((tmp_path / "a.sqz").read_bytes())
    assert old.records == new.records and old.header["pairs"] == new.header["pairs"]
    assert bytes(old._buf[old.data_start:]) == bytes(new._buf[new.data_start:])


@pytest.mark.parametrize("version, case, options", [
    ("2.0", "b3-auto", {"bits": 3}), ("2.0", "b4-rans", {"bits": 4, "entropy": "rans"}),
    ("2.1", "b3-auto", {"bits": 3, "sample": 0}), ("2.1", "b4-rans-compact", {"bits": 4, "sample": 0,
                                                                             "entropy": "rans-compact"}),
    ("2.3", "b3-auto", {"bits": 3, "sample": 0})])
def test_an_older_format_is_still_written_as_it_was(tmp_path, version, case, options):
    """`--format 2.0` is for readers older than 2.1 (auto keeps `rans`), `--format 2.1` for readers older than 2.2
    (no GRID codebooks): at -b, the same records and data bytes as that sqz wrote; only the generator string
    differs. (The rate-controlled encoder has improved since, so its older files are not the golden ones; they
    decode by the same rules.)"""
    from safetensors.torch import save_file

    golden = GOLDEN[0].parent.parent / f"v{version}" / f"{case}.sqz"
    src = tmp_path / "source.safetensors"
    save_file(mixed_tensors(), str(src), metadata={"format": "pt", "golden": "yes"})
    sqz.encode(src, tmp_path / "a.sqz", sqz.EncodeOptions(**options, format=version))
    old, new = Container(golden.read_bytes()), Container((tmp_path / "a.sqz").read_bytes())
    assert new.version == tuple(map(int, version.split(".")))
    assert old.records == new.records and old.header["pairs"] == new.header["pairs"]
    assert bytes(old._buf[old.data_start:]) == bytes(new._buf[new.data_start:])


def test_rans_compact_needs_format_2_1_and_auto_uses_it_there(tmp_path):
    with pytest.raises(sqz.InputError, match="rans-compact needs --format 2.1"):
        sqz.EncodeOptions(entropy="rans-compact", format="2.0")
    assert "rans" in sqz.EncodeOptions(format="2.0").stages and "rans-compact" not in sqz.EncodeOptions(
        format="2.0").stages
    assert "rans-compact" in sqz.EncodeOptions().stages and "rans" not in sqz.EncodeOptions().stages
    assert sqz.EncodeOptions(entropy="rans").stages == ("rans",)


def test_rans_grouped_needs_format_2_4_and_auto_uses_it_there(tmp_path):
    """`--format 2.3` is for readers older than 2.4: auto never writes rans-grouped there, and asking for it is an
    input error; 2.4's auto offers it."""
    with pytest.raises(sqz.InputError, match="rans-grouped needs --format 2.4"):
        sqz.EncodeOptions(entropy="rans-grouped", format="2.3")
    assert "rans-grouped" not in sqz.EncodeOptions(format="2.3").stages
    assert "rans-grouped" in sqz.EncodeOptions().stages
