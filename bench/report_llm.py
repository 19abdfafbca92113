"""The LLM section of REPORT.md (llm.json, and the trained-like synthetic adapter of codecs.json)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from bench import rd

KIND_LABEL = {"lora": "LoRA", "sinelora": "SineLoRA"}
RATES = (1.0, 1.5, 2.0, 3.0, 4.0)
CODECS = ("sqz --bpp", "sqz-auto", "paper (k-means+zip)", "uniform min-max", "absmax int (block 64)",
          "NF4 (block 64)", "ComPEFT-style", "LoRAQuant-style")
ANCHORS = tuple(c for c in CODECS if c not in ("sqz --bpp", "NF4 (block 64)"))  # NF4 is one point: no curve
QUALITIES = {"KL": rd.kl_db, "perplexity": rd.neg_perplexity, "ΔW SQNR": rd.sqnr("delta")}
STYLE = {"sqz --bpp": "*-", "sqz-auto": "o-", "paper (k-means+zip)": "s--", "uniform min-max": "^-",
         "absmax int (block 64)": "v-", "NF4 (block 64)": "D", "ComPEFT-style": "<-", "LoRAQuant-style": ">-",
         rd.MATCHED: "x"}


def label(name: str) -> str:
    kind, rank = name.split("-r")
    return f"{KIND_LABEL[kind]} r={rank}"


def headline_adapters(llm: dict) -> list[str]:
    """The largest-rank LoRA and SineLoRA: the adapters the tables at fixed rates are about."""
    names = list(llm["adapters"])
    return [max((n for n in names if n.startswith(f"{kind}-")), key=lambda n: int(n.split("-r")[1]))
            for kind in KIND_LABEL if any(n.startswith(f"{kind}-") for n in names)]


METRICS = (("kl", "KL from full precision (nats/token)", "log"), ("perplexity", "perplexity", "linear"),
           ("accuracy", "section accuracy", "linear"))
"""(row key, axis label, axis scale) of each task metric plotted against rate."""


def plot(llm: dict, path: Path, metrics: tuple[tuple[str, str, str], ...] = METRICS) -> None:
    """Rate against each task metric for the headline adapters (one row each)."""
    names = headline_adapters(llm)
    fig, axes = plt.subplots(len(names), len(metrics), figsize=(5.3 * len(metrics), 4.3 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        result = llm["adapters"][name]
        for col, (key, ylabel, yscale) in enumerate(metrics):
            ax = axes[row][col]
            for codec, style in STYLE.items():
                pts = sorted((r["bits_per_param"], r[key]) for r in result["rows"] if r["codec"] == codec)
                if pts:
                    ax.plot(*zip(*pts), style, label=codec, ms=4)
            if key != "kl":
                ax.axhline(result["full"][key], color="k", lw=1, label="full precision")
                ax.axhline(llm["base"][key], color="grey", ls=":", lw=1, label="no adapter")
            ax.set(xscale="log", yscale=yscale, xlabel="bits/param (every byte of the file)", ylabel=ylabel,
                   title=f"{label(name)} ({result['params']:,} params)")
            ax.grid(alpha=0.3, which="both")
            if key == "perplexity":
                ax.set_ylim(result["full"]["perplexity"] * 0.98, result["full"]["perplexity"] * 1.5)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table_adapters(llm: dict) -> str:
    lines = ["| adapter | params | fp16 file kB | ω | perplexity | section accuracy | ω·B@A rms |",
             "|---|---|---|---|---|---|---|",
             f"| no adapter | | | | {llm['base']['perplexity']:.1f} | {100 * llm['base']['accuracy']:.1f}% | |"]
    for name, res in llm["adapters"].items():
        fp16 = next(r for r in res["rows"] if r["codec"] == "fp16 safetensors")
        regime = f"{res['omega_BA_rms']:.2f}" if "omega_BA_rms" in res else ""
        lines.append(f"| {label(name)} | {res['params']:,} | {fp16['file_bytes'] / 1e3:.1f} | "
                     f"{res['omega'] or ''} | {res['full']['perplexity']:.1f} | {100 * res['full']['accuracy']:.1f}% | "
                     f"{regime} |")
    return "\n".join(lines)


def table_at_rates(result: dict, key: str, digits: int) -> str:
    """Each codec's `key` at 1, 1.5, 2, 3 and 4 bits/param (interpolated in log-rate between its settings)."""
    lines = ["| codec | " + " | ".join(f"{r:g} bits/param" for r in RATES) + " |", "|---|" + "---|" * len(RATES)]
    for codec in CODECS:
        cells = [rd.value_at(result["rows"], codec, rate, key) for rate in RATES]
        lines.append(f"| {codec} | " + " | ".join("—" if v is None else f"{v:.{digits}f}" for v in cells) + " |")
    return "\n".join(lines)


def table_components(llm: dict, targets: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)) -> str:
    """The share of each adapter's components a `--bpp` file keeps (the others decode to zero, and a decoded PEFT
    folder, sqz.peft and sqz.attach leave them out: the model's adapter matmuls shrink by as much)."""
    lines = ["| adapter | components | " + " | ".join(f"`--bpp {t:g}`" for t in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    for name, res in llm["adapters"].items():
        rows = {r["target_bpp"]: r for r in res["rows"] if r["codec"] == "sqz --bpp" and "components_kept" in r}
        if not rows:
            continue
        total = next(iter(rows.values()))["components"]
        cells = [f"{100 * rows[t]['components_kept'] / total:.0f}%" if t in rows else "—" for t in targets]
        lines.append(f"| {label(name)} | {total} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def single_points(result: dict) -> str:
    """Codecs with one setting (NF4, the lossless files): their rate, KL and perplexity."""
    rows = [r for r in result["rows"] if r["codec"] == "NF4 (block 64)" or r["family"] == "lossless"]
    return "One setting each: " + "; ".join(f"{r['codec']} {r['bits_per_param']:.2f} bits/param, KL {r['kl']:.4f}, "
                                            f"perplexity {r['perplexity']:.1f}" for r in rows) + "."


def table_bd(llm: dict, qualities: dict[str, rd.Quality] = QUALITIES) -> str:
    """BD-rate of sqz --bpp against every other codec, per adapter and metric."""
    lines = ["| adapter | metric | " + " | ".join(f"vs {a}" for a in ANCHORS) + " |", "|---|---|" + "---|" * len(ANCHORS)]
    for name, res in llm["adapters"].items():
        for metric, quality in qualities.items():
            cells = [rd.bd_rate(res["rows"], anchor, "sqz --bpp", quality) for anchor in ANCHORS]
            lines.append(f"| {label(name)} | {metric} | " + " | ".join(rd.fmt_bd(c) for c in cells) + " |")
    return "\n".join(lines)


def table_head_to_head(llm: dict, metrics: tuple[str, ...] = ("KL", "ΔW SQNR")) -> str:
    """Per adapter, by each metric (in dB): every other codec's file against `sqz --size` at its bytes."""
    lines = ["| adapter | metric | files compared | where `--size` is worse | closest |", "|---|---|---|---|---|"]
    for name, res in llm["adapters"].items():
        for metric in metrics:
            head = rd.head_to_head(res["rows"], QUALITIES[metric])
            lines.append(f"| {label(name)} | {metric} | {head['points']} | " + " | ".join(rd.fmt_head_to_head(head)) + " |")
    return "\n".join(lines)


def bd_summary(llm: dict) -> dict[str, float | str]:
    """Mean BD-rate of sqz --bpp against the paper's pipeline over the adapters, per metric."""
    out: dict[str, float | str] = {}
    for metric, quality in QUALITIES.items():
        values = [rd.bd_rate(res["rows"], "paper (k-means+zip)", "sqz --bpp", quality) for res in llm["adapters"].values()]
        numbers = [v for v in values if isinstance(v, float)]
        out[metric] = sum(numbers) / len(numbers) if len(numbers) == len(values) and numbers else "n/a"
    return out


def kl_note(llm: dict) -> list[str]:
    """Say where ΔW SQNR and KL disagree on which of `--bpp` and `-b` needs fewer bytes: ΔW SQNR alone would
    have ranked them wrongly there."""
    disagree = []
    for name, res in llm["adapters"].items():
        kl = rd.bd_rate(res["rows"], "sqz-auto", "sqz --bpp", rd.kl_db)
        delta = rd.bd_rate(res["rows"], "sqz-auto", "sqz --bpp", rd.sqnr("delta"))
        if isinstance(kl, float) and isinstance(delta, float) and (kl < 0) != (delta < 0):
            disagree.append(f"{label(name)} (KL {rd.fmt_bd(kl)}, ΔW SQNR {rd.fmt_bd(delta)})")
    if not disagree:
        return []
    return [(f"ΔW SQNR and KL disagree on whether `--bpp` needs fewer bytes than `-b` (sqz-auto) on "
             f"{len(disagree)} of the {len(llm['adapters'])} adapters: {'; '.join(disagree)}. An error's cost to the "
             "model is not its share of ||ΔW||², so ΔW SQNR alone would have ranked the codecs wrongly there."), ""]


def table1(llm: dict) -> str:
    """The paper's Table 1 on the LLM adapters: file size and perplexity / accuracy of sqz -b per rank."""
    bits = sorted({r["bits"] for res in llm["adapters"].values() for r in res["rows"] if r["codec"] == "sqz-auto"})
    lines = ["| adapter | " + " | ".join(f"{b}-bit" for b in bits) + " | full (fp16) |", "|---|" + "---|" * (len(bits) + 1)]
    for name, res in llm["adapters"].items():
        by_bits = {r["bits"]: r for r in res["rows"] if r["codec"] == "sqz-auto"}
        fp16 = next(r for r in res["rows"] if r["codec"] == "fp16 safetensors")
        cell = lambda r: f"{r['file_bytes'] / 1e3:.1f} kB, ppl {r['perplexity']:.1f}, {100 * r['accuracy']:.1f}%"
        lines.append(f"| {label(name)} | " + " | ".join(cell(by_bits[b]) if b in by_bits else "" for b in bits)
                     + f" | {cell(fp16)} |")
    return "\n".join(lines)


def table2(llm: dict) -> str:
    """The paper's Table 2 on the LLM: BD-rate of SineLoRA against LoRA at one rank, on the sqz -b curves."""
    lines = ["| rank | BD-rate on perplexity | BD-rate on section accuracy |", "|---|---|---|"]
    for name in llm["adapters"]:
        if not name.startswith("sinelora-"):
            continue
        twin = name.replace("sinelora-", "lora-")
        if twin not in llm["adapters"]:
            continue
        rows = [{**r, "codec": kind} for kind, n in (("lora", twin), ("sine", name))
                for r in llm["adapters"][n]["rows"] if r["codec"] == "sqz-auto"]
        cells = [rd.fmt_bd(rd.bd_rate(rows, "lora", "sine", q)) for q in (rd.neg_perplexity, lambda r: r["accuracy"])]
        lines.append(f"| {name.split('-r')[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table5(llm: dict) -> str:
    """The paper's Table 5 on the LLM: k-means (sqz -b) against uniform min-max at each width, perplexity."""
    lines = ["| adapter | bits | sqz k-means: perplexity | uniform min-max: perplexity |", "|---|---|---|---|"]
    for name, res in llm["adapters"].items():
        get = lambda codec, b: next((r for r in res["rows"] if r["codec"] == codec and r.get("bits") == b), None)  # noqa: B023
        for b in (1, 2, 3, 4):
            k, u = get("sqz-auto", b), get("uniform min-max", b)
            if k and u:
                lines.append(f"| {label(name)} | {b} | {k['perplexity']:.1f} | {u['perplexity']:.1f} |")
    return "\n".join(lines)


def table_statistics(stats: dict) -> str:
    """Trained adapter against its synthetic 8B-shaped twin, per projection."""
    lines = ["| projection | σ2/σ1 | σ4/σ1 | σ16/σ1 | B row-norm log-std | A rms / start | kurtosis A | kurtosis B |",
             "|---|---|---|---|---|---|---|---|"]
    for proj in stats["trained"]:
        for which in ("trained", "synthetic"):
            s = stats[which][proj]
            spec = s["spectrum"]
            lines.append(f"| {proj} ({which}) | {spec[1]:.3f} | {spec[3]:.3f} | {spec[-1]:.4f} | {s['b_row_logstd']:.2f} | "
                         f"{s['a_rms_ratio']:.2f} | {s['kurtosis_a']:.2f} | {s['kurtosis_b']:.2f} |")
    return "\n".join(lines)


def headline(llm: dict) -> list[str]:
    lines = []
    for name in headline_adapters(llm):
        res = llm["adapters"][name]
        at = lambda codec, key, rate=2.0, res=res: rd.value_at(res["rows"], codec, rate, key)
        ours, paper = at("sqz --bpp", "kl"), at("paper (k-means+zip)", "kl")
        bd = rd.bd_rate(res["rows"], "paper (k-means+zip)", "sqz --bpp", rd.kl_db)
        if ours is not None and paper is not None:
            lines.append(f"- {label(name)} on a {llm['pretrain']['params'] / 1e6:.1f}M-param LLaMA trained here: at 2 "
                         f"bits/param, sqz `--bpp` KL {ours:.4f} nats/token, perplexity "
                         f"{at('sqz --bpp', 'perplexity'):.1f} (full precision {res['full']['perplexity']:.1f}); the "
                         f"paper's pipeline KL {paper:.4f}. BD-rate on KL against the paper: {rd.fmt_bd(bd)}.")
    summary = bd_summary(llm)
    if all(isinstance(v, float) for v in summary.values()):
        lines.append(f"- BD-rate of `--bpp` against the paper's pipeline, mean over the {len(llm['adapters'])} LLM "
                     "adapters: " + ", ".join(f"{k} {v:+.1f}%" for k, v in summary.items()) + ".")
    for metric in ("KL", "ΔW SQNR"):
        head = rd.head_to_head_summary([(label(name), res["rows"], QUALITIES[metric])
                                        for name, res in llm["adapters"].items()])
        if head:
            lines.append(f"- Head to head on the LLM adapters, the other codecs' envelope against `sqz --size` at "
                         f"each file's bytes, by {metric}: {head}.")
    return lines


def section(llm: dict | None, like: dict | None, out: Path, rel) -> list[str]:
    if not llm:
        return []
    plot(llm, out / "llm.png")
    cfg, pre = llm["config"], llm["pretrain"]
    md = ["## 1. A small LLaMA with real PEFT adapters", "",
          (f"`bench/llm.py`: transformers' `LlamaForCausalLM` ({cfg['layers']} layers, hidden {cfg['hidden']}, "
           f"{cfg['heads']} query / {cfg['kv_heads']} key-value heads, {pre['params']:,} parameters) with a "
           f"{cfg['vocab']}-token byte-level BPE trained here, pretrained for {pre['seconds']:.0f} s on "
           f"{pre['tokens_seen']:,} tokens of Python's docstrings (held-out perplexity {pre['heldout_perplexity']:.0f}). "
           "Adapters: PEFT LoRA on q, k, v, o, gate, up, down (`get_peft_model`, `save_pretrained`) and SineLoRA, "
           f"α = 2r, fine-tuned for {cfg['epochs']} epoch on Debian package descriptions followed by their archive "
           "section. Metrics on "
           f"{llm['eval_records']} held-out records: perplexity of every token, KL of the next-token distribution "
           "from the full-precision adapter's, and section accuracy (argmax over the 14 section tokens)."), "",
          table_adapters(llm), "", f"![llm]({rel(out / 'llm.png')})", ""]
    for name in headline_adapters(llm):
        res = llm["adapters"][name]
        md += [f"### {label(name)}: KL (nats/token) at fixed rates", "", table_at_rates(res, "kl", 4), "",
               f"### {label(name)}: perplexity at fixed rates (full precision {res['full']['perplexity']:.1f})", "",
               table_at_rates(res, "perplexity", 1), "", single_points(res), ""]
    components = table_components(llm)
    if components:
        md += ["### Components kept: the rank a model runs each adapter at", "",
               ("The share of each adapter's rank-1 components that a `sqz --bpp` file keeps: the SVD gauge rounds "
                "the weak ones to zero, which a decoded PEFT folder, `sqz.peft` and `sqz.attach` leave out "
                "(`sqz/rank.py`: the same ΔW), so the model's adapter matmuls shrink by as much. The sine adapters' "
                "shares are what a sine runtime could leave out: sqz keeps their stored rank (PEFT has no sine "
                "LoRA, and `sqz.attach` applies their materialised ΔW)."), "", components, ""]
    md += ["### BD-rate of `sqz --bpp` against every other codec, per adapter", "",
           ("PCHIP on each codec's Pareto front (`bench/rd.py`): KL as −10·log10(KL), perplexity as −perplexity, "
            "ΔW SQNR in dB. Negative: `--bpp` needs fewer bytes for the same quality. NF4 is a single point, so "
            "it has no curve; its values are in the tables above."), "", table_bd(llm), "", *kl_note(llm),
           "### Head to head: each file against `sqz --size` at its bytes", "",
           ("As in section 4: `sqz encode --size` at the size of each file on the other codecs' upper envelope "
            "within the `--bpp` curve's rates, by KL (as −10·log10(KL), dB) and by ΔW SQNR."), "",
           table_head_to_head(llm), "",
           "### The paper's tables on the LLM adapters", "",
           "Table 1 (size, perplexity and section accuracy of sqz `-b` per width):", "", table1(llm), "",
           "Table 2 (BD-rate of SineLoRA against LoRA of the same rank, on the sqz `-b` curves):", "", table2(llm), "",
           "Table 5 (k-means against uniform min-max):", "", table5(llm), ""]
    if like:
        md += ["### Synthetic LLaMA-3-8B-shaped adapters with these statistics", "",
               (f"`synthetic.llama_adapter_like` ({like['params']:,} params, rank 16, every projection) matches the "
                "trained rank-16 LoRA above, projection by projection (section 4 has its rate-distortion):"), "",
               table_statistics(like["statistics"]), ""]
    return md
