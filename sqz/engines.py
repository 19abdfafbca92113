"""Where a catalog's tasks run: a local process pool (the default) or Ray. Both take fn(task) -> row, yield rows
in completion order, and turn a task whose worker died into `failed(task, message)`, so the driver always gets
one row per task and writes the manifest alone.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .errors import InputError

Row = dict[str, Any]
LOCAL_ROUNDS = 2  # pools a task may run in: a broken pool's tasks get one fresh pool more
RAY_RETRIES = 3  # re-runs of a task whose Ray worker died (a node lost, the OOM killer)
RAY_WINDOW_PER_CPU = 4  # tasks in flight per cluster CPU: enough to keep every worker busy, bounded for the driver
MEMORY_PER_SOURCE_BYTE = 10  # encode's peak RSS per byte of fp16 source, rounded up (measured on 56.6 MB: --bpp 8 467 MB,
# --bpp 2 277 MB, -b 3 152 MB, interpreter included; 914 MB at --bpp 8 before sqz 2.5.1 dropped its float64 copies)
MEMORY_BASE = 512 << 20  # a worker's interpreter, torch and sqz


def _worker_init() -> None:
    """Each worker: one thread (the pool is the parallelism), and killed with its parent: a SIGKILLed driver
    leaves no orphan writing into OUT behind it (Linux; elsewhere the orphan finishes its one task)."""
    import torch

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1  # the name in <sys/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def local_pool(fn: Callable[[Any], Row], tasks: list, failed: Callable[[Any, str], Row], workers: int) -> Iterator[Row]:
    """Tasks on `workers` fresh processes (spawned: no state of the driver's threads is inherited). A worker
    killed mid-task (the OOM killer) breaks the whole pool: the tasks it took down run once more in a fresh one,
    and only what fails there too becomes an error row."""
    context = multiprocessing.get_context("spawn")
    for _ in range(LOCAL_ROUNDS):
        if not tasks:
            return
        broken = []
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context,
                                 initializer=_worker_init) as pool:
            futures = {pool.submit(fn, task): task for task in tasks}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken.append(futures[future])
                except Exception as exc:  # noqa: BLE001 - a bug in a task: one error row, the others go on
                    yield failed(futures[future], f"worker failed: {type(exc).__name__}: {exc}".splitlines()[0])
        tasks = broken
    for task in tasks:
        yield failed(task, f"a worker process died while its pool ran this task, {LOCAL_ROUNDS} times")


def on_ray(fn: Callable[[Any], Row], tasks: list, failed: Callable[[Any, str], Row], address: str | None, workers: int,
           memory: Callable[[Any], int]) -> Iterator[Row]:
    """Tasks as Ray tasks: Ray started here (`address` None, `workers` CPUs) or joined at `address`. Each task
    declares one CPU and the memory its source's size implies; a task whose worker dies is retried RAY_RETRIES
    times; at most RAY_WINDOW_PER_CPU tasks per CPU are in flight; results come back as they finish (ray.wait, in
    batches of whatever is ready, so that the driver's cost per task stays small on a large cluster)."""
    try:
        import ray
    except ImportError:
        raise InputError('--ray needs Ray: pip install "sqz[ray]" (or, in a checkout, pip install -e ".[ray]")') from None
    if not tasks:
        return
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=workers if address is None else None, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    resources = ray.cluster_resources()
    largest = 0.9 * resources.get("memory", float("inf"))  # a larger request would wait forever: no node has it
    remote = ray.remote(max_retries=RAY_RETRIES)(fn)
    queue, pending = iter(tasks), {}

    def submit() -> None:
        task = next(queue, None)
        if task is not None:
            need = min(MEMORY_BASE + MEMORY_PER_SOURCE_BYTE * memory(task), largest)
            pending[remote.options(num_cpus=1, memory=int(need)).remote(task)] = task

    for _ in range(RAY_WINDOW_PER_CPU * max(1, int(resources.get("CPU", 1)))):
        submit()
    while pending:
        ray.wait(list(pending), num_returns=1)  # block for one, then take every other one that is ready too
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in done:
            task = pending.pop(ref)
            try:
                yield ray.get(ref)
            except ray.exceptions.RayError as exc:
                yield failed(task, f"ray task failed after {RAY_RETRIES} retries: {str(exc).splitlines()[0]}")
            submit()
