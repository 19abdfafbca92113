"""sqz.safe_open / sqz.load_file behave like safetensors' on the file `sqz decode` writes from the same .sqz."""
import pytest
import safetensors
import safetensors.torch
import torch

import sqz


@pytest.fixture
def pair(tmp_path, mixed_file):
    """A .sqz file (every dtype and role) and its decoded safetensors twin."""
    sqz.encode(mixed_file, tmp_path / "a.sqz", sqz.EncodeOptions(bits=3))
    sqz.decode(tmp_path / "a.sqz", tmp_path / "a.safetensors")
    return tmp_path / "a.sqz", tmp_path / "a.safetensors"


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(-1).view(torch.uint8) if x.numel() else x,
                                                                    y.view(-1).view(torch.uint8) if y.numel() else y)


def test_safe_open_parity(pair):
    path, twin = pair
    with sqz.safe_open(path, framework="pt", device="cpu") as ours, \
            safetensors.safe_open(str(twin), framework="pt", device="cpu") as theirs:
        assert ours.keys() == theirs.keys()
        assert sorted(ours.offset_keys()) == sorted(theirs.offset_keys())
        assert ours.metadata() == theirs.metadata() == {"format": "pt", "note": "mixed"}
        for name in theirs.keys():  # noqa: SIM118 - safe_open is no dict
            assert same(ours.get_tensor(name), theirs.get_tensor(name)), name
            mine, other = ours.get_slice(name), theirs.get_slice(name)
            assert (mine.get_shape(), mine.get_dtype()) == (other.get_shape(), other.get_dtype())
            if other.get_shape() and other.get_shape()[0] > 1:
                assert same(mine[1:], other[1:]), name
        with pytest.raises(KeyError, match="does not contain tensor nope"):
            ours.get_tensor("nope")
        with pytest.raises(sqz.SqzError):
            ours.get_slice("nope")


def test_load_file_parity_and_one_import_switch(pair):
    path, twin = pair
    ours, theirs = sqz.load_file(path), safetensors.torch.load_file(str(twin))
    assert ours.keys() == theirs.keys() and all(same(ours[k], theirs[k]) for k in theirs)
    assert sqz.load_file(path, device="cpu")["base_model.model.f16.q.lora_A.weight"].device.type == "cpu"


def test_no_metadata_and_other_frameworks(tmp_path, peft_dir):
    sqz.encode(peft_dir, tmp_path / "a.sqz")
    sqz.decode(tmp_path / "a.sqz", tmp_path / "a.safetensors")
    with sqz.safe_open(tmp_path / "a.sqz", "pt") as f, safetensors.safe_open(str(tmp_path / "a.safetensors"), "pt") as g:
        assert f.metadata() == g.metadata()
    with pytest.raises(sqz.InputError, match="framework='pt'"):
        sqz.safe_open(tmp_path / "a.sqz", framework="flax")
