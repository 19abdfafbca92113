"""The word-order section of REPORT.md (order.json): a MiniLM task where the adapter matters."""
from __future__ import annotations

from pathlib import Path

from bench import rd, report_llm

METRICS = (("kl", "KL from full precision (nats/sentence)", "log"), ("accuracy", "accuracy (were two words swapped?)", "linear"))
QUALITIES = {"KL": rd.kl_db, "accuracy": lambda row: row["accuracy"], "ΔW SQNR": rd.sqnr("delta")}


def table_adapters(order: dict) -> str:
    base = order["base"]["accuracy"]
    lines = ["| adapter | params | ω | accuracy | over no adapter |", "|---|---|---|---|---|",
             f"| no adapter | | | {100 * base:.1f}% | |"]
    for name, res in order["adapters"].items():
        acc = res["full"]["accuracy"]
        lines.append(f"| {report_llm.label(name)} | {res['params']:,} | {res['omega'] or ''} | {100 * acc:.1f}% | "
                     f"{100 * (acc - base):+.1f} points |")
    return "\n".join(lines)


def headline(order: dict) -> list[str]:
    base = order["base"]["accuracy"]
    lines = []
    for name, res in order["adapters"].items():
        at = lambda codec, rate, res=res: rd.value_at(res["rows"], codec, rate, "accuracy")
        ours, paper = at("sqz --bpp", 1.5), at("paper (k-means+zip)", 1.5)
        bd = rd.bd_rate(res["rows"], "paper (k-means+zip)", "sqz --bpp", rd.kl_db)
        if ours is not None:
            lines.append(f"- Word order on MiniLM, {report_llm.label(name)} (worth "
                         f"{100 * (res['full']['accuracy'] - base):.1f} points over no adapter): at 1.5 bits/param sqz "
                         f"`--bpp` {100 * ours:.1f}% (full precision {100 * res['full']['accuracy']:.1f}%"
                         + (f", the paper's pipeline {100 * paper:.1f}%" if paper is not None else "")
                         + f"). BD-rate on KL against the paper: {rd.fmt_bd(bd)}.")
    return lines


def section(order: dict | None, out: Path, rel) -> list[str]:
    if not order:
        return []
    report_llm.plot(order, out / "order.png", METRICS)
    cfg, data = order["config"], order["data"]
    md = ["## 3. MiniLM word order: a task where the adapter matters", "",
          (f"`bench/order.py`: the same Debian descriptions, each kept as it is or with two of its words swapped "
           f"({100 * data['swapped']:.0f}% of the test set), and the model says which ({data['train']:,} train / "
           f"{data['test']:,} test). Both versions hold the same words, so the frozen encoder's mean-pooled "
           "embedding with a linear probe (no adapter) is little above chance. Adapters as in section 2, "
           f"{cfg['epochs']} epoch, SineLoRA ω = {cfg['omega']:g}. Every codec of section 4 runs on each adapter; a "
           "reconstruction is scored by accuracy and by the KL of the classifier's two-way output from the "
           "full-precision adapter's (mean over test sentences; continuous, so every BD-rate is defined)."), "",
          table_adapters(order), "", f"![word order]({rel(out / 'order.png')})", ""]
    for name, res in order["adapters"].items():
        full = 100 * res["full"]["accuracy"]
        md += [f"### {report_llm.label(name)}: accuracy (%) at fixed rates (full precision {full:.1f}%)", "",
               report_llm.table_at_rates({"rows": [{**r, "accuracy": 100 * r["accuracy"]} for r in res["rows"]]},
                                         "accuracy", 1), "",
               f"### {report_llm.label(name)}: KL (nats/sentence) at fixed rates", "",
               report_llm.table_at_rates(res, "kl", 4), ""]
    md += ["### BD-rate of `sqz --bpp` against every other codec", "",
           "As in section 1: PCHIP on each codec's Pareto front, KL as −10·log10(KL); negative favours `--bpp`.", "",
           report_llm.table_bd(order, QUALITIES), "",
           "### Head to head: each file against `sqz --size` at its bytes", "",
           "As in section 1, by KL and by ΔW SQNR (dB).", "", report_llm.table_head_to_head(order), ""]
    return md
