"""`sqz encode-many`: a whole catalog of adapters into OUT/, resumable, on local processes or on Ray.

Each input (an adapter file, a PEFT folder, or what a folder holds) becomes OUT/<its path under SRC>.sqz, written
atomically by the worker that encodes it. The driver alone writes OUT/manifest.jsonl (manifest.py), a row per
adapter as it finishes, so a killed job resumes where it stopped: a rerun skips every input whose last row is
good for the same source bytes and options. One driver per OUT at a time (a lock file); stray temporary files
of a killed run are removed when the next one starts. A folder with a manifest is encode-many's: it overwrites
the .sqz files named after its inputs there (a killed run may have written some without their rows); in any
other folder an existing file needs --force. A bad input is an error row, never a stopped catalog.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import __version__, engines, manifest
from .adapter import WEIGHT_NAMES, SineOptions
from .api import DEFAULT_OPTIONS, NO_SINE, SqzWarning, encode
from .atomic import make_folder
from .codec import EncodeOptions
from .errors import InputError, OutputError, SqzError

DEFAULT_GLOBS = ("**/*.safetensors", "**/adapter_model.bin")
LOCK_NAME = ".encode-many.lock"
TMP_GLOB = ".*.sqz.*.tmp"  # atomic.py's temporary files for .sqz outputs


@dataclass(frozen=True)
class Job:
    """One adapter of the catalog: where it is, the files its hash covers, and its output's path under OUT."""

    name: str
    source: str
    files: tuple[str, ...]


def _job(source: Path, name: str) -> Job:
    if source.is_dir():
        weights = next(source / w for w in WEIGHT_NAMES if (source / w).is_file())
        config = source / "adapter_config.json"
        files = (weights, config) if config.is_file() else (weights,)
    else:
        files = (source,)
    return Job(name, str(source), tuple(map(str, files)))


def _is_peft_folder(path: Path) -> bool:
    return path.is_dir() and any((path / w).is_file() for w in WEIGHT_NAMES)


def discover(sources: list[str | Path], glob: str | None = None) -> list[Job]:
    """The catalog's adapters: files and PEFT folders as given, and in other folders every file matching `glob`
    (default: *.safetensors and adapter_model.bin at any depth; an adapter_model.* stands for its folder)."""
    jobs: dict[str, Job] = {}
    for src in map(Path, sources):
        if src.is_file():
            found = [_job(src, src.with_suffix(".sqz").name)]
        elif _is_peft_folder(src):
            found = [_job(src, src.name + ".sqz")]
        elif src.is_dir():
            found = []
            for pattern in (glob,) if glob else DEFAULT_GLOBS:
                for path in sorted(src.glob(pattern)):
                    if path.name in WEIGHT_NAMES:  # a PEFT folder: its config goes with it
                        rel = path.parent.relative_to(src)
                        found.append(_job(path.parent, f"{rel}.sqz" if rel.parts else src.name + ".sqz"))
                    elif not path.is_dir():  # a file, or a link to one that may fail to read: an error row
                        found.append(_job(path, str(path.relative_to(src).with_suffix(".sqz"))))
        else:
            raise InputError(f"{src}: no such file or directory")
        for job in found:
            if job.name in jobs and jobs[job.name].source != job.source:
                raise InputError(f"{jobs[job.name].source} and {job.source} would both be written to {job.name}")
            jobs[job.name] = job
    return list(jobs.values())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _row(job: Job, out: Path, options: dict, engine: str, **fields: Any) -> dict[str, Any]:
    row = {"version": manifest.ROW_VERSION, "name": job.name, "source": job.source, "source_sha256": None,
           "source_bytes": None, "output": str(out / job.name), "output_sha256": None, "output_bytes": None,
           "params": None, "bits_per_param": None, "sqnr_db": None, "encode_s": 0.0, "options": options,
           "status": "error", "error": None, "warnings": [], "sqz": __version__, "engine": engine, "finished": _now()}
    row.update(fields)
    return row


@dataclass(frozen=True)
class Task:
    """What a worker needs to encode one job (picklable: it travels to processes and Ray workers)."""

    job: Job
    out: str
    options: EncodeOptions
    sine: SineOptions
    settings: dict  # options and sine as the manifest records them
    engine: str
    source_sha256: str
    source_bytes: int


def encode_one(task: Task) -> dict[str, Any]:
    """Encode one adapter (in a worker) and return its manifest row; any SqzError becomes an error row."""
    out, job, start = Path(task.out), task.job, time.perf_counter()
    common = {"source_sha256": task.source_sha256, "source_bytes": task.source_bytes}
    try:
        dest = out / job.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # they go into the row, not onto a worker's stderr
            warnings.simplefilter("ignore", SqzWarning)
            report = encode(job.source, dest, task.options, task.sine, force=True, progress=False, workers=1,
                            measure=True)
        digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    except (SqzError, OSError) as exc:
        return _row(job, out, task.settings, task.engine, error=str(exc).splitlines()[0] if str(exc) else repr(exc),
                    encode_s=time.perf_counter() - start, **common)
    sqnr = report.sqnr_db if report.sqnr_db is not None and math.isfinite(report.sqnr_db) else None
    return _row(job, out, task.settings, task.engine, status="ok", output_sha256=digest,
                output_bytes=report.file_bytes, params=report.params, bits_per_param=report.bits_per_param,
                sqnr_db=sqnr, encode_s=time.perf_counter() - start, warnings=list(report.warnings), **common)


def failed(task: Task, message: str) -> dict[str, Any]:
    """The error row of a task whose worker died (the engines report it this way)."""
    return _row(task.job, Path(task.out), task.settings, task.engine, source_sha256=task.source_sha256,
                source_bytes=task.source_bytes, error=message)


@dataclass(frozen=True)
class Summary:
    inputs: int
    skipped: int
    encoded: int
    errors: int
    params: int  # parameters of the adapters encoded by this run
    seconds: float
    manifest: str

    @property
    def adapters_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0

    @property
    def params_per_s(self) -> float:
        return self.params / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "adapters_per_s": self.adapters_per_s, "params_per_s": self.params_per_s}


def _lock(out: Path):
    """An exclusive lock on OUT for this run (released by the kernel however the process ends)."""
    try:
        f = open(out / LOCK_NAME, "a")  # noqa: SIM115 - held for the whole run, closed by encode_many
    except OSError as exc:
        raise OutputError(f"{out}: cannot write there: {exc.strerror or exc}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise InputError(f"{out}: another sqz encode-many is writing there") from None
    return f


def _hash(job: Job) -> tuple[str, int] | str:
    try:
        return manifest.sha256_of([Path(f) for f in job.files])
    except OSError as exc:
        return f"{job.source}: cannot read ({exc.strerror or exc})"


def encode_many(sources: list[str | Path], out: str | Path, options: EncodeOptions = DEFAULT_OPTIONS,
                sine: SineOptions = NO_SINE, glob: str | None = None, redo: bool = False, force: bool = False,
                workers: int | None = None, ray: str | None = None, progress: bool | None = None) -> Summary:
    """Encode a catalog into `out`, appending to its manifest; `ray` (None: local processes) is "local" to start
    Ray here, or a cluster address ("auto", "ray://host:10001")."""
    out = Path(out)
    jobs = discover(sources, glob)
    make_folder(out)
    lock = _lock(out)
    try:
        for stale in out.rglob(TMP_GLOB):  # a killed run's temporary files: no run is writing now
            stale.unlink(missing_ok=True)
        workers = workers or os.cpu_count() or 1
        engine = "ray" if ray is not None else "local"
        start = time.perf_counter()
        todo, early, skipped = _plan(jobs, out, options, sine, engine, redo, force, workers)
        encoded = errors = params = 0
        bar = tqdm(total=len(early) + len(todo), desc="encode-many", unit="adapter", leave=False,
                   disable=not (sys.stderr.isatty() if progress is None else progress))
        with open(out / manifest.NAME, "a", encoding="utf-8") as f, bar:
            for row in itertools.chain(early, _run(todo, engine, ray, workers)):
                manifest.append(f, row)
                bar.update()
                if row["status"] == "ok":
                    encoded, params = encoded + 1, params + row["params"]
                else:
                    errors += 1
        return Summary(len(jobs), skipped, encoded, errors, params, time.perf_counter() - start,
                       str(out / manifest.NAME))
    finally:
        lock.close()


def _plan(jobs: list[Job], out: Path, options: EncodeOptions, sine: SineOptions, engine: str, redo: bool,
          force: bool, workers: int) -> tuple[list[Task], list[dict[str, Any]], int]:
    """What this run encodes, the error rows it writes without encoding (unreadable inputs, outputs it may not
    overwrite), and how many inputs the manifest already has good rows for. Sources are hashed on `workers`
    threads (hashlib releases the GIL)."""
    settings = {"encode": options.to_json(), "sine": asdict(sine)}
    owned = (out / manifest.NAME).exists()  # a catalog folder: its manifest is opened before any output is written
    rows = manifest.read(out / manifest.NAME)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashes = list(pool.map(_hash, jobs))
    todo, early, skipped = [], [], 0
    for job, digest in zip(jobs, hashes):
        dest, last = out / job.name, rows.get(job.name)
        if isinstance(digest, str):
            early.append(_row(job, out, settings, engine, error=digest))
        elif not redo and manifest.is_good(last, digest[0], settings, dest):
            skipped += 1
        elif dest.exists() and not (force or owned):
            early.append(_row(job, out, settings, engine, source_sha256=digest[0], source_bytes=digest[1],
                              error=f"{dest} exists and {out} is no encode-many output yet; use --force to "
                                    "overwrite it"))
        else:
            todo.append(Task(job, str(out), options, sine, settings, engine, digest[0], digest[1]))
    return todo, early, skipped


def _run(todo: list[Task], engine: str, ray: str | None, workers: int) -> Iterator[dict]:
    """Rows of the tasks, in completion order."""
    if engine == "ray":
        return engines.on_ray(encode_one, todo, failed, address=None if ray == "local" else ray, workers=workers,
                              memory=lambda task: task.source_bytes)
    return engines.local_pool(encode_one, todo, failed, workers)
