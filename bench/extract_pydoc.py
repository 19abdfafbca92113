"""Extract the LLM bench's pretraining corpus: the docstrings of Python's standard library (run once; committed).

Every module, class and function docstring longer than 80 characters, whitespace collapsed to one line each,
tests, IDLE, lib2to3 and the turtle demos left out. English technical prose, unlike the Debian package
descriptions the adapters are fine-tuned on. Run with the interpreter whose library you want:

    python -m bench.extract_pydoc /usr/lib/python3.11 > bench/data/pydoc.txt  # then gzip -n -9
"""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

SKIP = ("test", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo")
MIN_CHARS = 80


def docstrings(root: Path) -> Iterable[str]:
    for path in sorted(root.rglob("*.py")):
        if any(part in path.relative_to(root).as_posix() for part in SKIP):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node)
                if text and len(text) > MIN_CHARS:
                    yield " ".join(text.split())


def main() -> None:
    for line in docstrings(Path(sys.argv[1])):
        sys.stdout.write(line + "\n")


if __name__ == "__main__":
    main()
