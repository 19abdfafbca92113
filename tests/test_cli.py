"""The `sqz` console script, run as a user runs it: a real subprocess."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import sqz


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sqz.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          check=False)


def test_format_1_1_is_written_for_older_readers(tmp_path, peft_dir):
    """--format 1.1 writes what sqz 1.1 reads: F32 codebooks, a header with every 1.1 field; it decodes to what
    sqz 1.1 would have decoded, exact codebooks, which a 2.1 file rounds to float16 within its tolerance (2.2's
    GRID codebooks: test_grid)."""
    old, new = tmp_path / "old.sqz", tmp_path / "new.sqz"
    assert run("encode", peft_dir, "-b", "3", "-o", old, "--format", "1.1").returncode == 0
    assert run("encode", peft_dir, "-b", "3", "-o", new, "--format", "2.1").returncode == 0
    data = json.loads(run("info", old, "--json").stdout)
    assert data["version"] == "1.1" and all(t["codebook_dtype"] == "F32" for t in data["tensors"])
    f = sqz.container.Container(old)
    assert all({"offset", "crc32", "sample_size", "seed"} <= set(r) for r in f.records)
    assert new.stat().st_size < old.stat().st_size
    a, b = sqz.load(old), sqz.load(new)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-3, atol=0), name
    bad = run("encode", peft_dir, "-b", "3", "-o", tmp_path / "x.sqz", "--format", "1.0")
    assert bad.returncode == 2 and "1.1" in bad.stderr and not (tmp_path / "x.sqz").exists()


def test_encode_info_decode(tmp_path, peft_dir):
    out = tmp_path / "a.sqz"
    enc = run("encode", peft_dir, "-b", "3", "-o", out, "--json")
    assert enc.returncode == 0, enc.stderr
    summary = json.loads(enc.stdout)
    assert summary["file_bytes"] == out.stat().st_size and summary["quantized"] == summary["tensors"] > 0
    assert enc.stderr == ""  # piped: no progress bar

    info = run("info", out, "--json")
    data = json.loads(info.stdout)
    assert data["totals"]["file_bytes"] == out.stat().st_size
    assert sum(t["section_bytes"] for t in data["tensors"]) == data["totals"]["section_bytes"]
    assert data["version"] == "2.5"
    assert all(t["bits"] == 3 and t["codebook_size"] == 8 for t in data["tensors"])
    # float32 factors, 3 bits: a GRID codebook takes fewer than the 16 bytes of F16 entries
    assert {t["codebook_dtype"] for t in data["tensors"]} == {"GRID"}
    assert all(5 <= t["codebook_bytes"] < 16 for t in data["tensors"])
    table = run("info", out).stdout
    assert "bits/param" in table and "smaller than fp16" in table

    dec = run("decode", out, "-o", tmp_path / "r.safetensors")
    assert dec.returncode == 0, dec.stderr
    restored, adapter = load_file(str(tmp_path / "r.safetensors")), sqz.load(out)
    assert all(torch.equal(restored[k], adapter[k]) for k in adapter)


def test_errors_are_one_line_without_traceback(tmp_path, peft_dir):
    bad = tmp_path / "bad.sqz"
    bad.write_bytes(b"\x89SQZ\r\n\x1a\n" + b"\0" * 30)
    cases = [
        (("info", bad), "sqz: error:"),
        (("info", tmp_path / "missing.sqz"), "cannot open"),
        (("encode", tmp_path / "missing", "-o", tmp_path / "x.sqz"), "no such file"),
        (("encode", peft_dir, "-b", "9", "-o", tmp_path / "x.sqz"), "bits must be between 1 and 8"),
    ]
    good = tmp_path / "good.sqz"
    assert run("encode", peft_dir, "-b", "3", "-o", good).returncode == 0
    flipped = bytearray(good.read_bytes())
    flipped[-20] ^= 0x10  # in the last section: the header is fine, a tensor's CRC is not
    (tmp_path / "flipped.sqz").write_bytes(flipped)
    for flags in ((), ("--dtype", "fp32")):  # the torch-free decode and the one through sqz.load
        cases.append((("decode", tmp_path / "flipped.sqz", "-o", tmp_path / "x.safetensors", *flags), "CRC-32"))
    cases.append((("info", tmp_path / "flipped.sqz"), "CRC-32"))  # info reads GRID codebooks from their sections
    cases += [(("encode-many", peft_dir, "-o", good), f"{good}: cannot create the output folder"),  # a file there
              (("decode", good, "-o", f"{good}/sub/"), "cannot create the output folder")]
    if Path("/proc/self").is_dir():  # a directory nobody can create files in, root included
        cases += [(("encode", peft_dir, "-b", "3", "-o", "/proc/x.sqz"), "/proc/x.sqz: cannot write"),
                  (("decode", good, "-o", "/proc/x.safetensors"), "/proc/x.safetensors: cannot write"),
                  (("decode", good, "-o", "/proc/x.safetensors", "--dtype", "fp16"), "cannot write")]
    for args, message in cases:
        result = run(*args)
        assert result.returncode == 1, args
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "x.sqz").exists() and not (tmp_path / "x.safetensors").exists()


def test_force_is_needed_to_overwrite(tmp_path, peft_dir):
    out = tmp_path / "a.sqz"
    assert run("encode", peft_dir, "-o", out).returncode == 0
    before = out.read_bytes()
    again = run("encode", peft_dir, "-b", "2", "-o", out)
    assert again.returncode == 1 and "--force" in again.stderr and out.read_bytes() == before
    assert run("encode", peft_dir, "-b", "2", "-o", out, "--force").returncode == 0
    assert out.read_bytes() != before


def test_decode_to_peft_folder_and_delta(tmp_path, peft_dir):
    out = tmp_path / "a.sqz"
    run("encode", peft_dir, "-o", out)
    folder = run("decode", out, "-o", f"{tmp_path / 'adapter'}/", "--json")
    assert folder.returncode == 0, folder.stderr
    assert sorted(p.rsplit("/", 1)[1] for p in json.loads(folder.stdout)["outputs"]) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert run("decode", out, "-o", tmp_path / "d.safetensors", "--delta").returncode == 0
    assert set(load_file(str(tmp_path / "d.safetensors"))) == {p.module for p in sqz.load(out).pairs}
