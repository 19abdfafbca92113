"""`sqz info --components`: each pair's bits component by component, adding up to the file, and the components
that decode to zero, which a decoded PEFT folder leaves out."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file
from test_rank import decaying_lora

import sqz
from sqz import codec, container, entropy


@pytest.fixture(scope="module")
def target_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("components")
    src = decaying_lora(tmp / "src")
    sqz.encode(src, tmp / "a.sqz", sqz.EncodeOptions(sqnr=20.0))
    return tmp / "a.sqz"


@pytest.mark.parametrize("entropy_mode", ["none", "zstd", "zstd-aligned", "rans-compact", "rans-grouped",
                                          "rans-trellis"])
def test_indices_are_the_reference_decoders_and_bits_add_up_to_each_factor(tmp_path, entropy_mode):
    src = decaying_lora(tmp_path / "src")
    options = {"bits": 4} if entropy_mode != "rans-trellis" else {"sqnr": 25.0}
    sqz.encode(src, tmp_path / "a.sqz", sqz.EncodeOptions(entropy=entropy_mode, **options))
    f = container.Container(tmp_path / "a.sqz")
    items = [(r, f.section(i)) for i, r in enumerate(f.records) if r["encoding"] == "kmeans"]
    stages = {r["entropy"] for r, _ in items}
    assert entropy_mode in stages
    for (record, section), indices in zip(items, codec.decode_index_arrays(items, threads=2)):
        side = codec.read_side(record, section)
        reference = entropy.decode_indices(section[side.size:], int(np.prod(record["shape"])), record["bits"],
                                           record["codebook_size"], record["entropy"],
                                           codec.matrix_shape(record["shape"])[1])
        np.testing.assert_array_equal(indices, reference)
    data = sqz.info(tmp_path / "a.sqz", components=True)
    rows = {r["name"]: r for r in data["tensors"]}
    for pair in data["pairs"]:
        a, b = rows[f"{pair['module']}.lora_A.weight"], rows[f"{pair['module']}.lora_B.weight"]
        assert sum(pair["a_bits"]) * a["shape"][1] / 8 == pytest.approx(a["index_bytes_after"])
        assert sum(pair["b_bits"]) * b["shape"][0] / 8 == pytest.approx(b["index_bytes_after"])
        assert sum(pair["bytes"]) == pytest.approx(a["index_bytes_after"] + b["index_bytes_after"])
        if a["entropy"] == "none":  # every index costs the width, whatever its component
            assert pair["a_bits"] == pytest.approx([8 * a["index_bytes_after"] / a["params"]] * pair["rank"])


def test_weak_components_get_fewer_bits_and_the_zero_ones_are_those_a_folder_leaves_out(tmp_path, target_file):
    data = sqz.info(target_file, components=True)
    stages = {r["name"]: r["entropy"] for r in data["tensors"]}
    sqz.decode(target_file, str(tmp_path / "out") + "/")
    decoded = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sum(p["kept"] for p in data["pairs"]) < sum(p["rank"] for p in data["pairs"])
    for pair in data["pairs"]:
        assert decoded[f"{pair['module']}.lora_A.weight"].shape[0] == max(pair["kept"], 1)
        assert pair["kept"] == pair["zero"].count(False)
        a_bits = np.array(pair["a_bits"])
        assert a_bits[0] >= a_bits[-1]  # the SVD gauge orders components by σ, DECAY makes the last ones weak
        if stages[f"{pair['module']}.lora_A.weight"] in ("rans-grouped", "rans-trellis"):  # a model a component
            assert all(bits == 0 for bits, zero in zip(a_bits, pair["zero"]) if zero)  # zero: one index, no bits


def test_the_cli_prints_a_line_a_pair_and_the_count(target_file):
    run = subprocess.run([sys.executable, "-m", "sqz.cli", "info", str(target_file), "--components"],
                         capture_output=True, text=True, check=True)
    data = sqz.info(target_file, components=True)
    lines = run.stdout.splitlines()
    kept, rank = sum(p["kept"] for p in data["pairs"]), sum(p["rank"] for p in data["pairs"])
    assert lines[-1].startswith(f"{kept} of {rank} components kept ({rank - kept} decode to zero")
    first = data["pairs"][0]
    row = next(line for line in lines if line.startswith(first["module"] + " "))
    assert row.split()[1:3] == [str(first["rank"]), str(first["kept"])]
    assert row.split()[3:] == ["-" if z else f"{b:.0f}" for z, b in zip(first["zero"], first["bytes"])]
    as_json = json.loads(subprocess.run([sys.executable, "-m", "sqz.cli", "info", str(target_file), "--components",
                                         "--json"], capture_output=True, text=True, check=True).stdout)
    assert as_json["pairs"] == data["pairs"]
    plain = subprocess.run([sys.executable, "-m", "sqz.cli", "info", str(target_file)], capture_output=True,
                           text=True, check=True).stdout
    assert "components kept" not in plain  # only asked for: it decodes every factor
