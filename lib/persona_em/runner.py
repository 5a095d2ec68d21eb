"""`python -m persona_em run SNAKEMAKE_ARGS...`: Snakemake in this folder, resumable after any interruption.

A killed run (SIGKILL, a closed laptop, a lost node) leaves Snakemake's lock behind, and the next run would stop
with "Directory cannot be locked". This runner holds an OS lock (`flock` on `.snakemake/persona-em.lock`) for as
long as Snakemake runs; the kernel drops it when the runner dies, however it dies. So holding it proves that no
other run of this folder is alive: a Snakemake lock found then is stale and is cleared. Failing to get it means
another run is alive, and this one is refused with a message instead of racing it. What an interrupted job left
is never taken as done: notebooks execute under a temporary name, artifacts are written atomically, and
`--rerun-incomplete` re-runs the jobs Snakemake had marked as started.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(".snakemake")
LOCK = STATE / "persona-em.lock"


def stale_locks() -> list[Path]:
    return sorted((STATE / "locks").glob("*")) if (STATE / "locks").is_dir() else []


def main(args: list[str]) -> int:
    STATE.mkdir(exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = LOCK.read_text().strip() or "unknown process"
        print(f"error: another run of this folder is in progress ({owner}); wait for it to finish, or stop it "
              "and run again (it resumes where it stopped)", file=sys.stderr)
        return 3
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    stale = stale_locks()
    if stale:
        for f in stale:
            f.unlink()
        print(f"run: cleared {len(stale)} Snakemake lock file(s) left by an interrupted run (no run of this "
              "folder is alive); resuming", file=sys.stderr)
    snakemake = Path(sys.executable).parent / "snakemake"
    try:
        return subprocess.run([str(snakemake), *args]).returncode
    finally:
        os.close(fd)   # releases the flock
