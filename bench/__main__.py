"""python -m bench {all,llm,task,order,codecs,figure1,speed,serve,catalog,report} [--quick] [--out DIR]

all      every step below, then the report (under 45 minutes on 2 cores from a fresh clone; --quick: a few minutes)
llm      pretrain/cache a tiny LLaMA, fine-tune PEFT LoRA r1-16 + SineLoRA on it, and measure every codec on each
         adapter by ΔW SQNR, perplexity, KL from the full-precision adapter, and section accuracy (llm.json)
task     train/cache LoRA + SineLoRA on MiniLM, accuracy at full precision and after sqz (results/task.json)
order    a MiniLM task where the adapter matters (were two words swapped?): every codec on a LoRA and a SineLoRA,
         by accuracy and KL from the full-precision adapter (order.json)
codecs   rate-distortion of sqz against the alternatives on the MiniLM adapters, the i.i.d. LLaMA-shaped adapter
         (8 of the 28.3M adapter's 32 layers) and a LLaMA-3-8B-shaped one with the trained LLM adapter's
         statistics (codecs.json)
figure1  the paper's Figure 1, stable rank against bits (figure1.json)
speed    speed and memory on the 28.3M adapter, as ratios (speed.json)
catalog  sqz encode-many over 50 adapters: local pool against Ray, and the resume cost (catalog.json)
serve    a multi-adapter server: adapters per GiB of host memory, latency to ready on the device (serve.json;
         --device cuda measures on a GPU)
report   plots (PNG) and REPORT.md from the JSON files; a full run also refreshes the README's headline block
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench import catalog, codecs, figure1, llm, lora, order, report, serve, speed, synthetic, task
from bench.codecs import read_adapter
from bench.metrics import delta_rms
from bench.synthetic import write_llama_adapter

HERE = Path(__file__).parent
STEPS = ("llm", "task", "order", "codecs", "figure1", "speed", "serve", "catalog")
# The synthetic adapter's B@A entries are ~1e-4; ω = 1e4 puts ω·B@A at unit scale, where the sine is
# non-linear (ω = 200 would leave it in its linear range, where sine distortion equals plain distortion).
LLAMA_SINE_OMEGA = 1e4


def bar(total: int, desc: str = "") -> tqdm:
    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def task_config(quick: bool) -> task.TaskConfig:
    return task.TaskConfig.quick() if quick else task.TaskConfig()


def llm_config(quick: bool) -> llm.LLMConfig:
    return llm.LLMConfig.quick() if quick else llm.LLMConfig()


def run_llm(quick: bool) -> dict:
    """Every codec on every adapter of the tiny LLaMA, with the task metrics of each reconstruction."""
    setup = llm.run_setup(task.CACHE, llm_config(quick), progress_factory=bar, log=log)
    evaluator = llm.Evaluator(setup["model"], setup["test"])
    result = {"config": setup["config"], "pretrain": setup["pretrain"], "eval_records": len(setup["test"]),
              "base": evaluator({}), "adapters": {}}
    log(f"llm: no adapter: {result['base']}")
    for name, (directory, params) in setup["adapters"].items():
        scaling, omega = params["alpha"] / params["rank"], params["omega"]
        reference = read_adapter(directory)
        full = evaluator.set_reference(lora.deltas_of(reference, scaling, omega))
        log(f"llm: {name}: full precision {full}")
        res = codecs.run(directory, {"delta": omega}, quick, progress_factory=lambda n, name=name: bar(n, name),
                         task=lambda recon, s=scaling, w=omega: evaluator(lora.deltas_of(recon, s, w)))
        result["adapters"][name] = {**res, "full": full, "rank": params["rank"], "kind": params["kind"],
                                    "omega": omega, **task.sine_regime(reference, omega)}
    return result


def trained_like_adapter(quick: bool, directory: Path) -> tuple[Path, dict, float] | None:
    """LLaMA-3-8B-shaped factors with the rank and statistics of the LLM bench's largest trained LoRA (rank 16;
    None until the llm step has trained it); the sine ω puts ω·B@A where the largest trained SineLoRA put it."""
    cfg = llm_config(quick)
    rank = max(cfg.ranks)
    source, _ = llm.adapter_dir(task.CACHE, cfg, "lora", rank)
    sine, sine_params = llm.adapter_dir(task.CACHE, cfg, "sinelora", max(cfg.sine_ranks))
    if not (source / "train.json").exists() or not (sine / "train.json").exists():
        return None
    stats = synthetic.trained_statistics(read_adapter(source))
    tensors = synthetic.llama_adapter_like(stats, rank=rank, layers=1 if quick else 4)
    synthetic.save_adapter(directory, tensors, synthetic.llama_config(rank, targets=stats))
    arrays = {k: v.float().numpy() for k, v in tensors.items()}
    target = task.sine_regime(read_adapter(sine), sine_params["omega"])["omega_BA_rms"]
    omega = target / delta_rms(arrays)  # exact, without forming 28 products of up to 14336 x 4096
    return directory, {"trained": stats, "synthetic": synthetic.trained_statistics(arrays),
                       "source": source.name}, omega


def run_codecs(quick: bool) -> dict:
    cfg = task_config(quick)
    result = {"task_adapters": {}}
    for kind in task.KINDS:
        for rank in cfg.ranks:
            directory, params = task.adapter_dir(cfg, kind, rank)
            if not directory.exists():
                log(f"codecs: {kind} r={rank} not trained yet (run the task step first); skipped")
                continue
            log(f"codecs: {kind} r={rank}")
            result["task_adapters"][f"{kind}-r{rank}"] = codecs.run(
                directory, {"delta": params["omega"]}, quick, progress_factory=lambda n, kind=kind, rank=rank: bar(n, f"{kind} r={rank}"))
    with tempfile.TemporaryDirectory() as tmp:
        scale = 1 / 32 if quick else 0.25
        src = write_llama_adapter(Path(tmp) / "llama", scale=scale)
        log(f"codecs: LLaMA-3-8B-shaped adapter ({scale}x)")
        result["llama"] = codecs.run(src, {"plain": None, "sine": LLAMA_SINE_OMEGA}, quick, max_rows=256,
                                     progress_factory=lambda n: bar(n, "llama"))
        result["llama"]["scale"] = scale
        like = trained_like_adapter(quick, Path(tmp) / "llama-trained")
        if like is None:
            log("codecs: the LLM step's adapters are not trained yet (run the llm step first); trained-like skipped")
        else:
            src, stats, omega = like
            log(f"codecs: LLaMA-3-8B-shaped adapter with trained statistics (sine ω = {omega:.4g})")
            result["llama_trained"] = codecs.run(src, {"plain": None, "sine": omega}, quick, max_rows=256,
                                                 progress_factory=lambda n: bar(n, "llama trained-like"))
            result["llama_trained"]["statistics"] = stats
    return result


def run_figure1(quick: bool) -> dict:
    """Figure 1 on a synthetic pair, a trained MiniLM SineLoRA module and a trained LLM SineLoRA module."""
    cfg, llm_cfg = task_config(quick), llm_config(quick)
    sources = {"trained": (*task.adapter_dir(cfg, "sinelora", 4 if 4 in cfg.ranks else max(cfg.ranks)),
                           "base_model.model.encoder.layer.0.attention.self.query"),
               "trained LLM": (*llm.adapter_dir(task.CACHE, llm_cfg, "sinelora", max(llm_cfg.sine_ranks)),
                               "base_model.model.model.layers.0.self_attn.q_proj")}
    trained = {}
    for case, (directory, params, module) in sources.items():
        if (directory / "adapter_model.safetensors").exists():
            tensors = read_adapter(directory)
            trained[case] = (tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"], params["omega"], module)
    return figure1.run(trained)


def run_step(step: str, quick: bool, out: Path, device: str = "cpu") -> None:
    start = time.perf_counter()
    if step == "llm":
        result = run_llm(quick)
    elif step == "task":
        result = task.run(task_config(quick), progress_factory=bar, log=log)
    elif step == "order":
        result = order.run(order.OrderConfig.quick() if quick else order.OrderConfig(), quick, progress_factory=bar, log=log)
    elif step == "codecs":
        result = run_codecs(quick)
    elif step == "figure1":
        result = run_figure1(quick)
    elif step == "catalog":
        with tempfile.TemporaryDirectory() as tmp:
            result = catalog.run(Path(tmp), quick, log=log)
    elif step == "serve":
        with tempfile.TemporaryDirectory() as tmp:
            result = serve.run(Path(tmp), quick, device=device, log=log)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = speed.run(Path(tmp), quick, log=log)
    result["wall_s"] = time.perf_counter() - start
    result["quick"] = quick
    (out / f"{step}.json").write_text(json.dumps(result, indent=1, default=float))
    log(f"{step}: done in {result['wall_s']:.0f} s -> {out / f'{step}.json'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("all", *STEPS, "report"))
    parser.add_argument("--quick", action="store_true", help="small targets: a few minutes, for tests and checks")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results, or "
                        "bench/.cache/quick with --quick; the SQZ_BENCH_CACHE variable moves bench/.cache); "
                        "REPORT.md goes next to the results, except for bench/results, whose report is bench/REPORT.md")
    parser.add_argument("--device", default="cpu", help="where the serve step materialises adapters (cpu, cuda)")
    args = parser.parse_args(argv)
    out = args.out or (task.CACHE / "quick" if args.quick else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    for step in STEPS if args.step == "all" else () if args.step == "report" else (args.step,):
        run_step(step, args.quick, out, args.device)
    if args.step in ("all", "report"):
        main_results = out.resolve() == (HERE / "results").resolve()
        path = report.write(out, HERE / "REPORT.md" if main_results else out / "REPORT.md",
                            readme=HERE.parent / "README.md" if main_results else None)
        log(f"report: {path}")


if __name__ == "__main__":
    main()
