"""Extract the bench's text-classification task from Debian's package archive (run once; output is committed).

Each example is a package's one-line `Description` labelled with its archive `Section`, restricted to 14
topical sections. Descriptions that appear under more than one of those sections are dropped (ambiguous);
duplicates within a section are kept once. Run after `apt-get update`:

    apt-cache dumpavail | python -m bench.extract_debian > bench/data/debian-sections.tsv  # then gzip -n
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterable

SECTIONS = ("games", "science", "sound", "graphics", "net", "mail", "database", "editors", "video", "math",
            "electronics", "hamradio", "web", "text")
FIELD = re.compile(r"^(Package|Section|Description): (.*)$", re.MULTILINE)


def records(dump: str) -> Iterable[dict[str, str]]:
    for stanza in dump.split("\n\n"):
        fields = dict(FIELD.findall(stanza))
        if {"Package", "Section", "Description"} <= fields.keys():
            yield fields


def extract(dump: str) -> list[tuple[str, str, str]]:
    """(section, description, first package) rows, sorted, one per unambiguous description."""
    seen: dict[str, tuple[set[str], str]] = {}
    for rec in records(dump):
        section = rec["Section"].rsplit("/", 1)[-1]  # "contrib/games" -> "games"
        text = " ".join(rec["Description"].split())
        if section in SECTIONS and text:
            sections, _package = seen.setdefault(text, (set(), rec["Package"]))
            sections.add(section)
    return sorted((next(iter(s)), text, pkg) for text, (s, pkg) in seen.items() if len(s) == 1)


def main() -> None:
    sys.stdout.write("section\tdescription\tpackage\n")
    for row in extract(sys.stdin.read()):
        sys.stdout.write("\t".join(field.replace("\t", " ") for field in row) + "\n")


if __name__ == "__main__":
    main()
