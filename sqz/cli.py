"""`sqz encode | decode | info`: one line on error, exit status non-zero, never a traceback for bad input."""
from __future__ import annotations

import json
import math
import re
import time
import warnings
from typing import Any

import click
from click.core import ParameterSource

from . import __version__
from .adapter import SineOptions
from .api import SqzWarning, decode, encode, info
from .codec import ENTROPY_AUTO, EncodeOptions
from .constants import ENTROPY_STAGES, WRITABLE_VERSIONS
from .errors import InputError, SqzError
from .quantize import DEFAULT_SAMPLE, PAPER_SAMPLE

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class SqzGroup(click.Group):
    """Turns every SqzError (and a broken pipe or ^C) into one line on stderr and exit status 1/130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SqzWarning)  # commands print their warnings themselves
                return super().invoke(ctx)
        except SqzError as exc:
            click.echo(f"sqz: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("sqz: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=SqzGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sqz")
def main() -> None:
    """Compress LoRA adapters into .sqz files and back."""


def _emit(data: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def encode_options(command):
    """The options that decide a .sqz file's bytes, shared by `encode` and `encode-many`."""
    options = [
        click.option("-b", "--bits", default=3, show_default=True, type=int, help="Bits per index, 1..8 (codebook of 2^b)."),
        click.option("--bpp", type=float, help="Rate-distortion target: all-in file bits per parameter (replaces -b)."),
        click.option("--size", "size_text", metavar="SIZE",
                     help="Rate-distortion target: file size, e.g. 6MB, 512KiB, 80000."),
        click.option("--sqnr", type=float, help="Rate-distortion target: SQNR of ΔW in dB, met or exceeded (replaces -b)."),
        click.option("--sample", default=DEFAULT_SAMPLE, show_default=True, type=int,
                     help=f"0 fits the centroids on every value (exact); N > 0 on a seeded sample of N values, as the "
                          f"paper did with {PAPER_SAMPLE:,}."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the fitting sample (--sample N)."),
        click.option("--entropy", default=ENTROPY_AUTO, show_default=True,
                     type=click.Choice([ENTROPY_AUTO, *ENTROPY_STAGES]),
                     help="Entropy stage; auto keeps the smallest per tensor (rANS only where its saving is worth its "
                          "slower decode, at 1 µs per byte)."),
        click.option("--omega", type=float, help="Sine frequency ω: treat every pair as a sine-activated adapter."),
        click.option("--gamma", help="Sine divisor γ: a number, 'sqrt_in' (default) or 'K*sqrt_in'."),
        click.option("--alpha", type=float, help="lora_alpha, when no adapter_config.json gives it (scaling = alpha/r)."),
        click.option("--lossless", multiple=True, metavar="GLOB", help="Keep tensors matching GLOB exact (repeatable)."),
        click.option("--quantize", multiple=True, metavar="GLOB",
                     help="Also quantize non-factor float tensors matching GLOB."),
        click.option("--format", "format_version", default=EncodeOptions.format, show_default=True,
                     type=click.Choice([f"{a}.{b}" for a, b in WRITABLE_VERSIONS]),
                     help="Format version to write: 2.3 for readers older than sqz 2.4 (no rans-grouped), 2.2 for readers older than sqz 2.3 (codebooks of at most 256 entries), 2.1 for readers older than sqz 2.2 (F16 codebooks), 2.0 for readers older than sqz 2.1 (rANS count tables 4 bytes a level), 1.1 for readers older than sqz 2.0 (larger headers, F32 codebooks)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _options(bits: int, bpp: float | None, size_text: str | None, sqnr: float | None, sample: int, seed: int,
             entropy: str, omega: float | None, gamma: str | None, alpha: float | None, lossless: tuple[str, ...],
             quantize: tuple[str, ...], format_version: str) -> tuple[EncodeOptions, SineOptions]:
    options = EncodeOptions(bits=bits, sample=sample, seed=seed, entropy=entropy, lossless=lossless, quantize=quantize,
                            bpp=bpp, size=parse_size(size_text) if size_text is not None else None, sqnr=sqnr,
                            format=format_version)
    if options.target and click.get_current_context().get_parameter_source("bits") is ParameterSource.COMMANDLINE:
        click.echo(f"sqz: warning: with --{options.target}, -b {bits} sets only the width of tensors outside pairs "
                   f"(a factor without its partner, --quantize); the target chooses every pair's", err=True)
    return options, SineOptions(omega=omega, gamma=gamma, alpha=alpha)


@main.command("encode")
@click.argument("src", type=click.Path(exists=False))
@click.option("-o", "--output", required=True, type=click.Path(), help="The .sqz file to write.")
@encode_options
@click.option("-f", "--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def encode_cmd(src: str, output: str, force: bool, as_json: bool, **encoding: Any) -> None:
    """Encode an adapter (.safetensors, .bin, or a PEFT directory) into a .sqz file.

    -b N quantizes every factor at N bits (the paper's method). --bpp, --size or --sqnr instead store each pair
    in its SVD gauge (the same ΔW, other factors) and give each factor the width that serves ΔW best at one
    global slope, searched until the file meets the target."""
    options, sine = _options(**encoding)
    start = time.perf_counter()
    report = encode(src, output, options, sine, force=force)
    seconds = time.perf_counter() - start
    for message in report.warnings:
        click.echo(f"sqz: warning: {message}", err=True)
    data = {"output": str(report.path), "file_bytes": report.file_bytes, "params": report.params,
            "tensors": report.tensors, "quantized": report.quantized, "pairs": report.pairs,
            "bits_per_param": report.bits_per_param, "seconds": seconds,
            # JSON has no infinity: a target met losslessly (or with no pair to allocate) reports null
            "sqnr_db": report.sqnr_db if report.sqnr_db is not None and math.isfinite(report.sqnr_db) else None}
    sqnr_text = f", ΔW SQNR {report.sqnr_db:.2f} dB" if report.sqnr_db is not None else ""
    _emit(data, as_json, f"{report.path}: {report.file_bytes:,} bytes, {report.params:,} params, "
                         f"{report.bits_per_param:.3f} bits/param{sqnr_text}, {report.quantized}/{report.tensors} "
                         f"tensors quantized, {report.pairs} pairs, {seconds:.2f} s")


@main.command("encode-many")
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="The folder of .sqz files and manifest.jsonl.")
@encode_options
@click.option("--glob", "pattern", help="Files to take from folders given as SRC (default: **/*.safetensors and "
              "**/adapter_model.bin; an adapter_model.* stands for its PEFT folder).")
@click.option("--redo", is_flag=True, help="Encode every input again, even those the manifest has good rows for.")
@click.option("-f", "--force", is_flag=True, help="Overwrite .sqz files in an OUT that has no manifest yet.")
@click.option("--workers", type=int, help="Processes (or Ray CPUs when Ray starts here); default: every core.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Run on Ray: alone, start Ray on this machine; with an address (auto, ray://host:10001), join "
                   "that cluster. Needs the ray extra.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def encode_many_cmd(sources: tuple[str, ...], output: str, pattern: str | None, redo: bool, force: bool,
                    workers: int | None, ray_address: str | None, as_json: bool, **encoding: Any) -> None:
    """Encode a catalog of adapters (files, PEFT folders, folders of them) into OUT/, resumably.

    Each input becomes OUT/<path under its SRC>.sqz; OUT/manifest.jsonl gets a row per adapter as it finishes
    (README: "Catalogs"). A rerun skips what is already done; a bad input is an error row and exit status 1."""
    from .catalog import encode_many

    options, sine = _options(**encoding)
    summary = encode_many(list(sources), output, options, sine, glob=pattern, redo=redo, force=force,
                          workers=workers, ray=ray_address)
    _emit(summary.to_json(), as_json,
          f"{summary.inputs} adapters: {summary.encoded} encoded, {summary.skipped} already done, {summary.errors} "
          f"failed in {summary.seconds:.1f} s ({summary.adapters_per_s:.2f} adapters/s, "
          f"{summary.params_per_s / 1e6:.1f}M params/s); manifest {summary.manifest}")
    if summary.errors:
        raise SqzError(f"{summary.errors} of {summary.inputs} adapters failed: their rows in {summary.manifest} "
                       "say why")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'6MB' (decimal), '512KiB' (binary) or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise InputError(f"--size must be a number of bytes with an optional unit (KB, MB, GB, KiB, MiB, GiB), "
                         f"got {text!r}")
    return int(float(match[1]) * _UNITS[(match[2] or "").upper()])


@main.command("decode")
@click.argument("src", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(),
              help="A .safetensors file, or DIR/ for a PEFT adapter folder.")
@click.option("--delta", is_flag=True, help="Write the materialised ΔW of each module instead of the factors.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), help="Cast every tensor to this dtype.")
@click.option("--keep-rank", is_flag=True,
              help="A PEFT folder keeps every pair's stored rank (by default components that decode to zero are "
                   "left out, with rank_pattern/alpha_pattern saying so: the same ΔW).")
@click.option("-f", "--force", is_flag=True, help="Overwrite outputs that exist.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def decode_cmd(src: str, output: str, delta: bool, dtype: str | None, keep_rank: bool, force: bool,
               as_json: bool) -> None:
    """Decode a .sqz file back to safetensors (PEFT / diffusers loadable)."""
    start = time.perf_counter()
    cast = None
    if dtype:  # only a cast (or --delta) needs torch, whose import is most of a plain decode's run
        import torch

        cast = getattr(torch, DTYPES[dtype])
    written = decode(src, output, force=force, delta=delta, dtype=cast, keep_rank=keep_rank)
    data = {"outputs": [str(p) for p in written], "seconds": time.perf_counter() - start}
    _emit(data, as_json, "\n".join(str(p) for p in written))


@main.command("info")
@click.argument("src", type=click.Path())
@click.option("--components", is_flag=True,
              help="Also each pair's bits component by component, and which components decode to zero.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def info_cmd(src: str, components: bool, as_json: bool) -> None:
    """Show where every bit of a .sqz file went."""
    data = info(src, components=components)
    _emit(data, as_json, _info_table(data) + ("\n\n" + _components_table(data["pairs"]) if components else ""))


def _components_table(pairs: list[dict]) -> str:
    """One line a pair: its rank, the components kept (not decoding to zero) and the bytes each takes (A and B)."""
    head = ("pair", "rank", "kept", "bytes by component (A and B; - decodes to zero)")
    rows = [head] + [(p["module"], str(p["rank"]), str(p["kept"]),
                      " ".join("-" if zero else f"{size:.0f}" for zero, size in zip(p["zero"], p["bytes"])))
                     for p in pairs]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2]), row[3]])
             for row in rows]
    rank, kept = sum(p["rank"] for p in pairs), sum(p["kept"] for p in pairs)
    summary = f"{kept:,} of {rank:,} components kept ({rank - kept:,} decode to zero: a PEFT folder leaves them out)"
    return "\n".join([*lines, "", summary])


def _info_table(data: dict) -> str:
    head = ("tensor", "shape", "role", "bits", "entropy", "codebook B", "packed B", "coded B", "bits/param")
    # codebook B counts a record's scales too (2.0): codebook B + coded B is the section
    rows = [head]
    for r in data["tensors"]:
        rows.append((r["name"], "x".join(map(str, r["shape"])) or "scalar", r["role"],
                     r["dtype"] if r["bits"] is None else str(r["bits"]), r["entropy"], f"{r['codebook_bytes'] + r['scale_bytes']:,}",
                     f"{r['index_bytes_before']:,}", f"{r['index_bytes_after']:,}", f"{r['bits_per_param']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    t = data["totals"]
    lines += ["",
              (f"file {data['path']}: format {data['version']}, {t['file_bytes']:,} bytes "
              f"(header {t['header_bytes']:,}, sections {t['section_bytes']:,})"),
              (f"{t['params']:,} params in {t['tensors']} tensors ({t['quantized']} quantized, {t['pairs']} pairs): "
              f"{t['bits_per_param']:.3f} bits/param, {t['ratio_to_fp16']:.2f}x smaller than fp16")]
    if t["widths"]:
        lines.append("quantized tensors by index width: " + ", ".join(f"{b} bits x {n}" for b, n in t["widths"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
