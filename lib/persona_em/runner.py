"""`python -m persona_em run SNAKEMAKE_ARGS...`: Snakemake in this folder, resumable after any interruption;
`python -m persona_em clean PROFILE`: delete a profile's runs, never under a live run.

A killed run (SIGKILL, a closed laptop, a lost node) leaves Snakemake's lock behind, and the next run would stop
with "Directory cannot be locked". The runner takes an OS lock (`flock` on `.snakemake/persona-em.lock`) and then
becomes Snakemake (exec, same process, the lock's descriptor inherited), so the lock lives exactly as long as
Snakemake does and the kernel drops it when Snakemake dies, however it dies. Holding it therefore proves that no
run of this folder is alive: a Snakemake lock found then is stale and is cleared. Failing to get it means another
run is alive, and this one is refused with a message instead of racing it. (Snakemake started by hand, not
through `make`, takes no such lock; do not run it beside `make reproduce` in one folder.) What an interrupted job
left is never taken as done: notebooks execute under a temporary name, artifacts are written atomically, a run
clears its own temporaries when it starts again, and `--rerun-incomplete` re-runs the jobs Snakemake had marked
as started.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

STATE = Path(".snakemake")
LOCK = STATE / "persona-em.lock"


class Busy(RuntimeError):
    pass


def acquire() -> int:
    """The folder's run lock, as an open descriptor; Busy if a live run holds it."""
    STATE.mkdir(exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        owner = LOCK.read_text().strip() or "unknown process"
        raise Busy(f"another run of this folder is in progress ({owner}); wait for it to finish, or stop it and "
                   "run again (it resumes where it stopped)") from None
    return fd


def clear_stale_locks() -> int:
    stale = sorted((STATE / "locks").glob("*")) if (STATE / "locks").is_dir() else []
    for f in stale:
        f.unlink()
    return len(stale)


KERNEL = "persona-em"


def ensure_kernel(name: str = KERNEL, prefix: str | None = None) -> str | None:
    """The Jupyter kernel papermill runs the chapters in (persona_em.kernels: started warm during a workflow
    run), registered for this Python if no kernel of that name is found (`make setup` registers it in .venv; a
    conda environment made from environment.yml does not) and re-registered where a kernel of that name runs
    this Python without the warm start. Returns a note when it registered one or when the kernel found runs
    another Python."""
    from jupyter_client.kernelspec import KernelSpecManager

    from .kernels import install, kernel_spec

    display = f"{name} ({Path(sys.prefix).name})"
    specs = KernelSpecManager().find_kernel_specs()
    if name in specs:
        argv = KernelSpecManager().get_kernel_spec(name).argv
        # compare the environments (a venv's python links to its base interpreter, so resolving the python
        # itself would make every venv of one Python look alike)
        if argv and Path(argv[0]).parent.parent.resolve() != Path(sys.executable).parent.parent.resolve():
            return (f"note: kernel {name!r} ({specs[name]}) runs {argv[0]}, not this Python ({sys.executable}); "
                    "the chapters will run there")
        if argv[1:] == kernel_spec(display)["argv"][1:]:
            return None
        try:
            install(name, display, folder=specs[name])
        except OSError as e:   # e.g. a read-only system folder: the kernel works, cold
            return f"note: kernel {name!r} ({specs[name]}) starts cold in workflow runs (not re-registered: {e})"
        return f"re-registered the Jupyter kernel {name!r} in {specs[name]} to start warm in workflow runs"
    where = install(name, display, prefix=prefix)
    return f"registered the Jupyter kernel {name!r} for {sys.executable} in {where}"


def run(args: list[str]) -> int:
    try:
        fd = acquire()
    except Busy as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    note = ensure_kernel()
    if note:
        print(f"run: {note}", file=sys.stderr, flush=True)
    n = clear_stale_locks()
    if n:
        print(f"run: cleared {n} Snakemake lock file(s) left by an interrupted run (no run of this folder is "
              "alive); resuming", file=sys.stderr, flush=True)
    snakemake = str(Path(sys.executable).parent / "snakemake")
    os.set_inheritable(fd, True)
    os.execv(snakemake, [snakemake, *args])   # never returns


def clean(profile: str) -> int:
    from .paths import check_name

    try:
        check_name(profile, "profile name")
        fd = acquire()
    except (ValueError, Busy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    try:
        shutil.rmtree(Path("runs") / profile, ignore_errors=True)
        for entry in STATE.iterdir():   # Snakemake's records of every profile; the lock file stays
            if entry != LOCK:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        print(f"removed runs/{profile} and Snakemake's records in {STATE}/")
        return 0
    finally:
        os.close(fd)
