"""Encode, info and decode run without importing torch (its import is ~2 s, most of a CLI run's start-up), while
the names that need it still come with `import sqz`, imported on first use."""
import json
import subprocess
import sys
from pathlib import Path

# In a fresh interpreter: the CLI encodes (-b and a target), shows info and decodes (to a file and to a PEFT
# folder), then reports what it imported.
_CLI_RUN = """
import json, sys
from sqz.cli import main
src, out = sys.argv[1], sys.argv[2]
for args in (["encode", src, "-b", "3", "-o", out], ["encode", src, "--sqnr", "20", "-o", out, "-f"], ["info", out],
             ["decode", out, "-o", out + ".safetensors"], ["decode", out, "-o", out + ".peft/"]):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "peft", "transformers"))))
"""


def test_cli_encode_info_and_decode_import_no_torch(mixed_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.sqz"
    run = subprocess.run([sys.executable, "-c", _CLI_RUN, str(mixed_file), str(out)], capture_output=True, text=True,
                         check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    assert out.stat().st_size > 0
    assert (tmp_path / "a.sqz.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "a.sqz.peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_torch_names_come_on_first_use() -> None:
    code = """
import sys, sqz
before = "torch" in sys.modules
names = {n: getattr(sqz, n) for n in sqz.__all__}
import sqz.merging  # the module imported again by name leaves sqz.merge the function
print(before, "torch" in sys.modules, callable(sqz.merge), sqz.load.__module__, sqz.SqzAdapter.__module__,
      sorted(n for n in sqz.__all__ if n not in dir(sqz)))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "True", "True", "sqz.loader", "sqz.loader", "[]"]
