"""Encode real adapter files and read them back through every public path."""
import json
import math
import pickle

import pytest
import torch
from conftest import mixed_tensors, sine_dir
from safetensors.torch import load_file, save_file

import sqz
from sqz import container
from sqz.adapter import read_adapter

LOSSY_ROLES = {"lora_A", "lora_B"}


@pytest.mark.parametrize("entropy", ["auto", "none", "zstd", "rans", "zstd-aligned", "rans-compact", "rans-grouped"])
def test_every_dtype_and_role_round_trips(tmp_path, mixed_file, entropy):
    out = tmp_path / "m.sqz"
    sqz.encode(mixed_file, out, sqz.EncodeOptions(bits=4, entropy=entropy))
    original = mixed_tensors()
    adapter = sqz.load(out)
    assert set(adapter) == set(load_file(str(mixed_file))) and len(adapter) == len(original)
    records = {r["name"]: r for r in adapter.header["tensors"]}
    for name, tensor in original.items():
        got = adapter[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        if records[name]["encoding"] == "raw":
            assert torch.equal(got, tensor), name  # lossless: bit-exact
        else:
            assert records[name]["role"] in LOSSY_ROLES
            assert records[name]["entropy"] == entropy or entropy == "auto" or records[name]["codebook_size"] == 1
            error = (got.double() - tensor.double()).norm() / tensor.double().norm()
            assert error < 0.1, (name, float(error))
    assert {r["role"] for r in records.values()} == {"lora_A", "lora_B", "alpha", "magnitude", "other"}
    assert records["base_model.model.f16.q.lora_magnitude_vector"]["encoding"] == "raw"
    assert adapter.metadata == {"format": "pt", "note": "mixed"}


def test_auto_stores_a_factor_exactly_when_that_is_smaller(tmp_path):
    """At 8 bits a 4x32 factor costs ~150 B of (GRID) codebook + 128 B of indices, more than its 256 exact bytes."""
    g = torch.Generator().manual_seed(1)
    tensors = {"m.small.lora_A.weight": torch.randn(4, 32, generator=g).half(),
               "m.small.lora_B.weight": torch.randn(32, 4, generator=g).half(),
               "m.big.lora_A.weight": torch.randn(8, 2048, generator=g).half(),
               "m.big.lora_B.weight": torch.randn(2048, 8, generator=g).half()}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    sizes = {}
    for entropy in ("auto", "none"):
        out = tmp_path / f"{entropy}.sqz"
        sqz.encode(tmp_path / "a.safetensors", out, sqz.EncodeOptions(bits=8, entropy=entropy))
        records = {r["name"]: r for r in sqz.load(out).header["tensors"]}
        sizes[entropy] = out.stat().st_size
        small = records["m.small.lora_A.weight"]["encoding"]
        assert small == ("raw" if entropy == "auto" else "kmeans")
        assert records["m.big.lora_A.weight"]["encoding"] == "kmeans"
        if entropy == "auto":
            assert torch.equal(sqz.load(out)["m.small.lora_A.weight"], tensors["m.small.lora_A.weight"])
    assert sizes["auto"] < sizes["none"]


def test_auto_keeps_rans_only_where_it_clearly_saves(tmp_path):
    """auto's choice per tensor: the smallest fast stage, rANS only where the bytes it saves are worth its extra
    decode time (BYTE_WORTH_NS per byte against RANS_DECODE_NS per index)."""
    from sqz import entropy
    from sqz.codec import BYTE_WORTH_NS, RANS_DECODE_NS
    from sqz.quantize import quantize, tensor_seed

    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)  # StudentT samples from the global generator
    tensors = {"m.t.lora_A.weight": (torch.rand(4, 3000, generator=g) - 0.5).half(),  # uniform: codes gain nothing
               "m.t.lora_B.weight": torch.distributions.StudentT(3.0).sample((30000, 4)).half(),  # heavy tails
               "m.u.lora_A.weight": (torch.rand(4, 3000, generator=g) - 0.5).half(),
               "m.u.lora_B.weight": torch.distributions.StudentT(1.5).sample((30000, 4)).half()}  # heavier still
    save_file(tensors, str(tmp_path / "a.safetensors"))
    sqz.encode(tmp_path / "a.safetensors", tmp_path / "a.sqz", sqz.EncodeOptions(bits=3))
    records = {r["name"]: r for r in sqz.load(tmp_path / "a.sqz").header["tensors"]}
    for name, tensor in tensors.items():
        q = quantize(tensor.double().numpy().ravel(), 3, 10_000, tensor_seed(0, name))
        size = {s: len(entropy.encode_indices(q.indices, 3, q.codebook.size, s))
                for s in ("none", "zstd", "zstd-aligned", "rans-compact")}
        fast = min(("none", "zstd-aligned", "zstd"), key=lambda s: size[s])
        worth = (size[fast] - size["rans-compact"]) * BYTE_WORTH_NS >= RANS_DECODE_NS * q.indices.size
        expected = "rans-compact" if worth else fast
        assert records[name]["entropy"] == expected, (name, size)
    # Huffman is within 1% of rANS on t(3)-like factors, and loses more as one bin takes most of the mass
    assert [records[f"m.{m}.lora_B.weight"]["entropy"] for m in "tu"] == ["zstd-aligned", "rans-compact"]


def test_decoded_values_are_exactly_the_codebook_entries(tmp_path, mixed_file):
    out = tmp_path / "m.sqz"
    sqz.encode(mixed_file, out, sqz.EncodeOptions(bits=2))
    adapter = sqz.load(out)
    for record in adapter.header["tensors"]:
        if record["encoding"] == "kmeans":
            values = torch.unique(adapter[record["name"]])
            assert values.numel() <= record["codebook_size"] <= 4


def test_pairs_scaling_and_kohya_conv_delta(tmp_path, mixed_file):
    out = tmp_path / "m.sqz"
    sqz.encode(mixed_file, out, sqz.EncodeOptions(bits=8))
    adapter = sqz.load(out)
    pairs = {p.module: p for p in adapter.pairs}
    conv = pairs["lora_unet_conv1"]
    assert (conv.layer, conv.scaling) == ("conv", 2.0 / 4)  # kohya alpha / rank
    up, down = adapter["lora_unet_conv1.lora_up.weight"].float(), adapter["lora_unet_conv1.lora_down.weight"].float()
    expected = 0.5 * (up.reshape(12, 4) @ down.reshape(4, -1)).reshape(12, 8, 3, 3)
    assert torch.allclose(adapter.delta("lora_unet_conv1"), expected)
    emb = adapter.delta("base_model.model.embed")
    assert emb.shape == (30, 16) and pairs["base_model.model.embed"].layer == "embedding"
    with pytest.raises(KeyError):
        adapter.delta("nope")


def test_sine_adapter_from_reference_bin(tmp_path):
    src = sine_dir(tmp_path / "sine", freq=200.0)
    out = tmp_path / "s.sqz"
    sqz.encode(src, out, sqz.EncodeOptions(bits=8))
    adapter = sqz.load(out)
    assert adapter.config["peft_type"] == "SINLORA"
    for pair in adapter.pairs:
        a, b = adapter[pair.a], adapter[pair.b]
        assert pair.kind == "sine" and pair.omega == 200.0 and pair.scaling == 4 / 2
        assert pair.gamma == pytest.approx(math.sqrt(a.shape[1]))
        direct = torch.sin(200.0 * (b @ a)) / math.sqrt(a.shape[1]) * (4 / 2)
        assert torch.allclose(adapter.delta(pair.module), direct, atol=1e-6)
        assert not torch.allclose(adapter.delta(pair.module), 2.0 * (b @ a), atol=1e-3)


def test_omega_and_gamma_flags(tmp_path, peft_dir):
    out = tmp_path / "s.sqz"
    sqz.encode(peft_dir, out, sine=sqz.SineOptions(omega=30.0, gamma="2*sqrt_in"))
    pair = sqz.load(out).pairs[0]
    fan_in = sqz.load(out)[pair.a].shape[1]
    assert (pair.kind, pair.omega, pair.gamma) == ("sine", 30.0, pytest.approx(2 * math.sqrt(fan_in)))
    with pytest.raises(sqz.InputError, match="--gamma"):
        sqz.encode(peft_dir, tmp_path / "x.sqz", sine=sqz.SineOptions(gamma="sqrt_in"))
    with pytest.raises(sqz.InputError, match="--gamma must be"):
        sqz.encode(peft_dir, tmp_path / "x.sqz", sine=sqz.SineOptions(omega=1.0, gamma="fast"))


def test_rslora_and_patterns_give_per_module_scaling(tmp_path):
    from conftest import peft_lora_dir

    src = peft_lora_dir(tmp_path / "p", use_rslora=True, rank_pattern={"value": 2}, alpha_pattern={"value": 6})
    config = json.loads((src / "adapter_config.json").read_text())
    adapter = read_adapter(src)
    for pair in adapter.pairs:
        rank, alpha = (2, 6) if pair.module.endswith("value") else (config["r"], config["lora_alpha"])
        assert adapter.tensors[pair.a].shape[0] == rank
        assert pair.scaling == pytest.approx(alpha / math.sqrt(rank))


def test_encoding_is_deterministic(tmp_path, mixed_file):
    a, b = tmp_path / "a.sqz", tmp_path / "b.sqz"
    sqz.encode(mixed_file, a, sqz.EncodeOptions(bits=3, sample=20, seed=5))
    sqz.encode(mixed_file, b, sqz.EncodeOptions(bits=3, sample=20, seed=5), workers=1)
    assert a.read_bytes() == b.read_bytes()


def test_lossless_and_quantize_globs(tmp_path, mixed_file):
    out = tmp_path / "g.sqz"
    opts = sqz.EncodeOptions(bits=3, lossless=("*f32.q.lora_A*",), quantize=("*modules_to_save*weight",))
    sqz.encode(mixed_file, out, opts)
    records = {r["name"]: r for r in sqz.load(out).header["tensors"]}
    assert records["base_model.model.f32.q.lora_A.weight"]["encoding"] == "raw"
    assert records["base_model.model.classifier.modules_to_save.default.weight"]["encoding"] == "kmeans"


def test_file_without_pairs_encodes_losslessly_with_a_warning(tmp_path):
    src = tmp_path / "plain.safetensors"
    save_file({"w": torch.randn(5, 5), "b": torch.randn(5)}, str(src))
    with pytest.warns(sqz.SqzWarning, match="no LoRA factor pairs"):
        sqz.encode(src, tmp_path / "p.sqz")
    adapter = sqz.load(tmp_path / "p.sqz")
    assert torch.equal(adapter["w"], load_file(str(src))["w"])


def test_bad_encoder_inputs_get_one_clear_error_each(tmp_path):
    cases = {
        "nan.safetensors": {"m.lora_A.weight": torch.tensor([[float("nan"), 1.0]]), "m.lora_B.weight": torch.ones(2, 1)},
        "ranks.safetensors": {"m.lora_A.weight": torch.ones(4, 8), "m.lora_B.weight": torch.ones(8, 3)},
    }
    for name, tensors in cases.items():
        save_file(tensors, str(tmp_path / name))
    with pytest.raises(sqz.InputError, match="NaN/inf"):
        sqz.encode(tmp_path / "nan.safetensors", tmp_path / "o.sqz")
    with pytest.raises(sqz.InputError, match="mismatched ranks"):
        sqz.encode(tmp_path / "ranks.safetensors", tmp_path / "o.sqz")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a tensor file")
    with pytest.raises(sqz.InputError, match="not a readable safetensors"):
        sqz.encode(tmp_path / "junk.safetensors", tmp_path / "o.sqz")
    with pytest.raises(sqz.InputError, match="no such file"):
        sqz.encode(tmp_path / "missing.safetensors", tmp_path / "o.sqz")
    assert not (tmp_path / "o.sqz").exists()


class Boom:
    def __reduce__(self):
        return (open, ("/tmp/sqz-pwned", "w"))


def test_crafted_pickle_is_refused_without_running_code(tmp_path):
    import os

    path = tmp_path / "adapter_model.bin"
    path.write_bytes(pickle.dumps({"x.lora_A.weight": Boom()}))
    with pytest.raises(sqz.InputError, match="weights_only"):
        sqz.encode(path, tmp_path / "o.sqz")
    assert not os.path.exists("/tmp/sqz-pwned")


def test_decode_writes_safetensors_peft_folder_and_delta(tmp_path, peft_dir):
    out = tmp_path / "a.sqz"
    sqz.encode(peft_dir, out, sqz.EncodeOptions(bits=8))
    [single] = sqz.decode(out, tmp_path / "r.safetensors")
    restored = load_file(str(single))
    assert set(restored) == set(load_file(str(peft_dir / "adapter_model.safetensors")))
    _weights, config = sqz.decode(out, str(tmp_path / "folder") + "/")
    assert json.loads(config.read_text()) == json.loads((peft_dir / "adapter_config.json").read_text())
    [delta] = sqz.decode(out, tmp_path / "d.safetensors", delta=True)
    deltas = load_file(str(delta))
    adapter = sqz.load(out)
    assert set(deltas) == {p.module for p in adapter.pairs}
    assert all(torch.equal(deltas[m], adapter.delta(m)) for m in deltas)
    with pytest.raises(sqz.OutputExistsError):
        sqz.decode(out, tmp_path / "r.safetensors")
    sqz.decode(out, tmp_path / "r.safetensors", force=True, dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / "r.safetensors")).values())


def test_a_cast_or_delta_decode_opens_the_file_once(tmp_path, peft_dir, monkeypatch):
    """--dtype and --delta decode through sqz.load on the file decode() opened for the config: one open, so the
    config and the tensors come from the same file."""
    out = tmp_path / "a.sqz"
    sqz.encode(peft_dir, out, sqz.EncodeOptions(bits=4))
    opened, real = [], container.Container.__init__
    monkeypatch.setattr(container.Container, "__init__", lambda self, *a, **k: (opened.append(a), real(self, *a, **k))[1])
    sqz.decode(out, str(tmp_path / "folder") + "/", dtype=torch.float32)
    sqz.decode(out, tmp_path / "d.safetensors", delta=True)
    assert len(opened) == 2
    assert set(load_file(str(tmp_path / "d.safetensors"))) == {p.module for p in sqz.load(out).pairs}


def _safetensors_parts(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


def test_decode_without_torch_writes_what_torch_would(tmp_path):
    """sqz.decode hands the decoder's bytes to safetensors' framework-free serializer: every dtype (bool, ints,
    F8, BF16, F64, empty) comes back as sqz.load gives it, and the file is what safetensors.torch.save_file
    writes from sqz.load's tensors (header and data; __metadata__ as a mapping: its keys' order is a hash map's in
    safetensors' file, sorted in sqz's)."""
    tensors = {**mixed_tensors(), "extra.e4m3": (torch.randn(7) * 3).to(torch.float8_e4m3fn),
               "extra.e5m2": torch.randn(2, 3).to(torch.float8_e5m2), "extra.u16": torch.arange(5, dtype=torch.int32).to(torch.uint16)}
    src, out = tmp_path / "src.safetensors", tmp_path / "a.sqz"
    save_file(tensors, str(src), metadata={"format": "pt", "note": "every dtype"})
    sqz.encode(src, out, sqz.EncodeOptions(bits=3))
    [written] = sqz.decode(out, tmp_path / "r.safetensors")
    adapter = sqz.load(out)
    restored = load_file(str(written))
    assert set(restored) == set(tensors)
    assert all(restored[k].dtype == tensors[k].dtype and torch.equal(restored[k].reshape(-1).view(torch.uint8),
                                                                     adapter[k].reshape(-1).view(torch.uint8))
               for k in tensors)
    save_file(dict(adapter), str(tmp_path / "torch.safetensors"), metadata=adapter.metadata)
    assert _safetensors_parts(written) == _safetensors_parts(tmp_path / "torch.safetensors")
    assert _safetensors_parts(written)[0]["__metadata__"] == {"format": "pt", "note": "every dtype"}


@pytest.mark.parametrize("options", [{}, {"dtype": torch.float16}])
def test_a_decoded_file_is_the_same_bytes_every_time(tmp_path, options):
    """A kohya adapter carries dozens of ss_* metadata keys; safetensors 0.8 writes __metadata__ in a hash map's
    order, different at each save, so two decodes of one file differed and a decoded file's hash meant nothing.
    sqz writes the keys sorted (either writer path: straight from the decoder, or through torch for --dtype)."""
    metadata = {f"ss_{key}": str(i) for i, key in enumerate(("network_dim", "lr", "seed", "epoch", "network_alpha",
                                                              "base_model", "steps", "resolution", "é ü \"q\" \n"))}
    src, out = tmp_path / "src.safetensors", tmp_path / "a.sqz"
    save_file(mixed_tensors(), str(src), metadata=metadata)
    sqz.encode(src, out, sqz.EncodeOptions(bits=3))
    first, second = (sqz.decode(out, tmp_path / f"r{i}.safetensors", **options)[0].read_bytes() for i in range(2))
    assert first == second
    header = json.loads(first[8:8 + int.from_bytes(first[:8], "little")])
    assert list(header["__metadata__"]) == sorted(metadata) and header["__metadata__"] == metadata
    assert (8 + int.from_bytes(first[:8], "little")) % 8 == 0
    assert load_file(str(tmp_path / "r0.safetensors")).keys() == mixed_tensors().keys()


def test_decode_to_a_folder_needs_a_config_and_leaves_nothing_without_one(tmp_path):
    """A file with neither an adapter_config.json nor LoRA pairs has no PEFT config to write: decoding it to a
    folder fails before anything is written; to a file it works."""
    src, out = tmp_path / "src.safetensors", tmp_path / "a.sqz"
    save_file({"model.norm.weight": torch.ones(8)}, str(src))
    sqz.encode(src, out)
    with pytest.raises(sqz.SqzError, match="no adapter_config.json and no LoRA pairs"):
        sqz.decode(out, str(tmp_path / "folder") + "/")
    assert not (tmp_path / "folder").exists()
    [written] = sqz.decode(out, tmp_path / "r.safetensors")
    assert torch.equal(load_file(str(written))["model.norm.weight"], torch.ones(8))


def test_encode_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path, peft_dir):
    out = tmp_path / "a.sqz"
    out.write_bytes(b"precious")
    with pytest.raises(sqz.OutputExistsError, match="--force"):
        sqz.encode(peft_dir, out)
    assert out.read_bytes() == b"precious"
    sqz.encode(peft_dir, out, force=True)
    assert out.read_bytes()[:4] == b"\x89SQZ"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sqz", "peft"]


def test_encode_holds_blas_to_one_thread_and_one_in_another_thread_does_not_lift_it(tmp_path, peft_dir, monkeypatch):
    """sqz.encode holds numpy's BLAS to one thread while it runs (its own workers use the cores). The limit is
    process-wide and set from the main thread only, so an encode in another thread, overlapping one in the main
    thread, neither lifts it when it ends nor changes what the caller had."""
    import threading

    import numpy  # noqa: F401 - its BLAS is what the limit is on
    from threadpoolctl import threadpool_info, threadpool_limits

    from sqz.api import _blas_held

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    if not blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library")
    seen = {}
    gauge = sqz.targets.gauge.in_svd_gauge  # the gauge's QR is BLAS work: record the limit it runs under

    def in_svd_gauge(*args):
        if threading.current_thread() is threading.main_thread():
            seen["main thread, in the gauge"] = blas_threads()
        return gauge(*args)

    monkeypatch.setattr(sqz.targets.gauge, "in_svd_gauge", in_svd_gauge)

    def other() -> None:
        sqz.encode(peft_dir, tmp_path / "other.sqz", sqz.EncodeOptions(bpp=3.0))
        seen["after the other thread's encode"] = blas_threads()

    with threadpool_limits(2, user_api="blas"):
        with _blas_held():  # what sqz.encode does in the main thread, held open while the other thread encodes
            seen["main thread, encoding"] = blas_threads()
            worker = threading.Thread(target=other)
            worker.start()
            worker.join()
        seen["after both"] = blas_threads()
        sqz.encode(peft_dir, tmp_path / "main.sqz", sqz.EncodeOptions(bpp=3.0))
        seen["after an encode in the main thread"] = blas_threads()
    assert seen == {"main thread, encoding": {1}, "after the other thread's encode": {1}, "after both": {2},
                    "main thread, in the gauge": {1}, "after an encode in the main thread": {2}}
