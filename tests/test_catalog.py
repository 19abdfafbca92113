"""sqz encode-many: a catalog encoded by the local pool and by Ray, identical bytes, resumable after SIGKILL."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import save_file

import sqz
from sqz import catalog, manifest

ROOT = Path(__file__).resolve().parent.parent
CATALOG = 20  # inputs, of which one corrupt and one unreadable


def make_catalog(root: Path, scale: int = 1) -> Path:
    """18 real adapters of mixed sizes (files, PEFT folders, nested), a corrupt file and a dangling link."""
    for i in range(CATALOG - 2):
        g = torch.Generator().manual_seed(i)
        rank, width = 2 + i % 4, 32 * scale * (1 + i % 5)
        tensors = {}
        for m in range(1 + i % 3):
            tensors[f"base_model.model.layers.{m}.q.lora_A.weight"] = (torch.randn(rank, width, generator=g) / 8).half()
            tensors[f"base_model.model.layers.{m}.q.lora_B.weight"] = (torch.randn(width, rank, generator=g) / 64).half()
        if i % 3 == 0:  # a PEFT folder, nested
            folder = root / f"team{i % 2}" / f"peft{i}"
            folder.mkdir(parents=True)
            save_file(tensors, str(folder / "adapter_model.safetensors"))
            (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}))
        else:
            (root / f"team{i % 2}").mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(root / f"team{i % 2}" / f"file{i}.safetensors"), metadata={"n": str(i)})
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    (root / "unreadable.safetensors").symlink_to(root / "gone" / "missing.safetensors")
    return root


def check_final_state(out: Path, summary=None) -> dict:
    rows = manifest.read(out / manifest.NAME)
    assert len(rows) == CATALOG
    for line in (out / manifest.NAME).read_text().splitlines():
        jsonschema.validate(json.loads(line), manifest.SCHEMA)
    bad = {name for name, row in rows.items() if row["status"] == "error"}
    assert bad == {"corrupt.sqz", "unreadable.sqz"}
    assert "not a readable safetensors file" in rows["corrupt.sqz"]["error"]
    assert "cannot read" in rows["unreadable.sqz"]["error"]
    for name, row in rows.items():
        if row["status"] == "ok":
            data = (out / name).read_bytes()
            assert len(data) == row["output_bytes"] and sqz.load(data).keys()
            assert row["sqnr_db"] > 5 and row["bits_per_param"] > 1 and row["params"] > 0
    assert not list(out.rglob("*.tmp"))
    return {name: (out / name).read_bytes() for name, row in rows.items() if row["status"] == "ok"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_catalog(tmp_path_factory.mktemp("catalog"))


def test_local_pool_and_ray_write_identical_files(source, tmp_path):
    ray = pytest.importorskip("ray")
    local = catalog.encode_many([source], tmp_path / "local", sqz.EncodeOptions(bits=3), workers=2)
    assert (local.inputs, local.encoded, local.errors, local.skipped) == (CATALOG, CATALOG - 2, 2, 0)
    expected = check_final_state(tmp_path / "local")
    assert set(expected) >= {"team0/peft0.sqz", "team1/file1.sqz"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
    try:
        on_ray = catalog.encode_many([source], tmp_path / "ray", sqz.EncodeOptions(bits=3), workers=2, ray="local")
    finally:
        ray.shutdown()
    assert (on_ray.encoded, on_ray.errors) == (CATALOG - 2, 2)
    assert check_final_state(tmp_path / "ray") == expected
    engines = {json.loads(line)["engine"] for line in (tmp_path / "ray" / manifest.NAME).read_text().splitlines()}
    assert engines == {"ray"}


def test_a_rerun_skips_what_is_done_and_redoes_what_changed(source, tmp_path):
    out = tmp_path / "out"
    catalog.encode_many([source], out, workers=2)
    lines = (out / manifest.NAME).read_text().count("\n")
    again = catalog.encode_many([source], out, workers=2)
    assert (again.skipped, again.encoded, again.errors) == (CATALOG - 2, 0, 2)  # failures are retried
    assert (out / manifest.NAME).read_text().count("\n") == lines + 2

    (out / "team1" / "file1.sqz").write_bytes(b"damaged")  # a good row whose output is gone bad: redone
    other = sqz.EncodeOptions(bits=2)
    assert catalog.encode_many([source], out, workers=2).encoded == 1
    assert catalog.encode_many([source], out, other, workers=2).encoded == CATALOG - 2  # other options
    assert catalog.encode_many([source], out, other, workers=2, redo=True).encoded == CATALOG - 2
    check_final_state(out)


def test_outputs_no_row_wrote_need_force(source, tmp_path):
    out = tmp_path / "out"
    (out / "team1").mkdir(parents=True)
    (out / "team1" / "file1.sqz").write_bytes(b"a user's file")
    summary = catalog.encode_many([source], out, workers=1)
    row = manifest.read(out / manifest.NAME)["team1/file1.sqz"]
    assert row["status"] == "error" and "no encode-many output yet; use --force" in row["error"] and summary.errors == 3
    assert (out / "team1" / "file1.sqz").read_bytes() == b"a user's file"
    assert catalog.encode_many([source], out, workers=1, force=True).encoded == 1
    (out / "team1" / "file1.sqz").write_bytes(b"left by a killed run")  # the folder is a catalog's now
    assert catalog.encode_many([source], out, workers=1, redo=True).errors == 2


def test_one_driver_per_folder_and_a_cut_last_row(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / catalog.LOCK_NAME, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(sqz.InputError, match="another sqz encode-many"):
            catalog.encode_many([source], out)
    (out / manifest.NAME).write_text('{"name": "x.sqz", "status": "ok"}\n{"name": "y.s')
    assert set(manifest.read(out / manifest.NAME)) == {"x.sqz"}
    assert (out / manifest.NAME).read_text().endswith("}\n")


def test_sigkill_of_the_driver_resumes_to_the_same_final_state(tmp_path):
    source = make_catalog(tmp_path / "src", scale=24)
    reference = tmp_path / "reference"
    catalog.encode_many([source], reference, workers=2)
    expected = check_final_state(reference)

    out = tmp_path / "out"
    command = [sys.executable, "-m", "sqz.cli", "encode-many", str(source), "-o", str(out), "--workers", "2"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        rows = (out / manifest.NAME).read_text().count("\n") if (out / manifest.NAME).exists() else 0
        if rows >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows_at_kill = (out / manifest.NAME).read_text().count("\n")
    assert 3 <= rows_at_kill < CATALOG, "the driver finished before it could be killed: make the catalog larger"
    time.sleep(1)  # the workers die with the driver (PR_SET_PDEATHSIG)
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 1 and "2 of 20 adapters failed" in resumed.stderr  # the corrupt and the unreadable
    assert check_final_state(out) == expected
    done_before = {json.loads(line)["name"] for line in (out / manifest.NAME).read_text().splitlines()[:rows_at_kill]}
    redone = [json.loads(line)["name"] for line in (out / manifest.NAME).read_text().splitlines()[rows_at_kill:]]
    assert not (set(redone) & done_before - {"corrupt.sqz", "unreadable.sqz"})  # what was done stayed done


def test_cli_summary_and_ray_missing(source, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sqz.cli import main

    result = CliRunner().invoke(main, ["encode-many", str(source / "team0"), "-o", str(tmp_path / "o"), "--json",
                                       "-b", "2", "--workers", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["encoded"] == summary["inputs"] == 9 and summary["params_per_s"] > 0
    rows = manifest.read(tmp_path / "o" / manifest.NAME)
    assert all(row["options"]["encode"]["bits"] == 2 and row["sqnr_db"] > 5 for row in rows.values())
    monkeypatch.setitem(sys.modules, "ray", None)
    result = CliRunner().invoke(main, ["encode-many", str(source / "team1"), "-o", str(tmp_path / "r"), "--ray"])
    assert result.exit_code == 1 and 'pip install "sqz[ray]"' in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_readme_prints_the_schema_the_rows_are_checked_against():
    text = (ROOT / "README.md").read_text()
    block = text.split("### Manifest rows", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    assert json.loads(block) == manifest.SCHEMA


def test_a_killed_worker_costs_its_tasks_one_more_pool_not_their_rows(tmp_path):
    from catalog_tasks import always_dies, dies_once

    from sqz import engines

    failed = lambda task, message: {"task": task[0], "status": "error", "error": message}
    tasks = [(i, str(tmp_path / "marker")) for i in range(8)]
    rows = list(engines.local_pool(dies_once, tasks, failed, workers=2))
    assert sorted(r["task"] for r in rows) == list(range(8)) and all(r["status"] == "ok" for r in rows)
    rows = list(engines.local_pool(always_dies, tasks, failed, workers=2))
    assert sorted(r["task"] for r in rows) == list(range(8))  # one row per task, whatever happens
    bad = {r["task"]: r["error"] for r in rows if r["status"] == "error"}
    assert 3 in bad and "died" in bad[3]
