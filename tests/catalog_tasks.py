"""Task functions for the local pool's tests: module-level, so that spawned workers can import them."""
import os
import signal
from pathlib import Path


def dies_once(task: tuple[int, str]) -> dict:
    """Task (i, marker): task 3 SIGKILLs its worker the first time (the marker file records that it did)."""
    i, marker = task
    if i == 3 and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return {"task": i, "status": "ok"}


def always_dies(task: tuple[int, str]) -> dict:
    i, _ = task
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"task": i, "status": "ok"}
