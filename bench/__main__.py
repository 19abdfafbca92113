"""python -m bench {all,task,codecs,figure1,speed,report} [--quick] [--out DIR]

all      every step below, then the report (under 40 minutes on 2 cores; --quick: a few minutes)
task     train/cache LoRA + SineLoRA on MiniLM, accuracy at full precision and after sqz (results/task.json)
codecs   rate-distortion of sqz against the alternatives on task adapters and the 28.3M adapter (codecs.json)
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

from bench import catalog, codecs, figure1, report, serve, speed, task
from bench.codecs import read_adapter
from bench.synthetic import write_llama_adapter

HERE = Path(__file__).parent
STEPS = ("task", "codecs", "figure1", "speed", "serve", "catalog")
# The synthetic adapter's B@A entries are ~1e-4; ω = 1e4 puts ω·B@A at unit scale, where the sine is
# non-linear (ω = 200 would leave it in its linear range, where sine distortion equals plain distortion).
LLAMA_SINE_OMEGA = 1e4


def bar(total: int, desc: str = "") -> tqdm:
    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def task_config(quick: bool) -> task.TaskConfig:
    return task.TaskConfig.quick() if quick else task.TaskConfig()


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
        scale = 1 / 32 if quick else 1.0
        src = write_llama_adapter(Path(tmp) / "llama", scale=scale)
        log(f"codecs: LLaMA-3-8B-shaped adapter ({scale}x)")
        result["llama"] = codecs.run(src, {"plain": None, "sine": LLAMA_SINE_OMEGA}, quick, max_rows=256,
                                     progress_factory=lambda n: bar(n, "llama"))
        result["llama"]["scale"] = scale
    return result


def run_figure1(quick: bool) -> dict:
    cfg = task_config(quick)
    directory, params = task.adapter_dir(cfg, "sinelora", 4 if 4 in cfg.ranks else max(cfg.ranks))
    trained = None
    if directory.exists():
        tensors = read_adapter(directory)
        module = "base_model.model.encoder.layer.0.attention.self.query"
        trained = (tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"], params["omega"], module)
    return figure1.run(trained)


def run_step(step: str, quick: bool, out: Path, device: str = "cpu") -> None:
    start = time.perf_counter()
    if step == "task":
        result = task.run(task_config(quick), progress_factory=bar, log=log)
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
