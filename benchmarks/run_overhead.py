"""Per-run overhead of each chapter: the seconds from `python -m papermill` starting (as a Snakemake job starts
it) to the first line of the chapter's own work, and where they go: Python, papermill and the kernel starting
(an empty notebook in the same kernel), the chapter's setup cell (imports, the profile, the run's provenance),
and loading the embedded model where the chapter's work starts with it (chapters 1-4; chapter 4's setup cell
loads it itself, the untrained base here). Each chapter is run as its
own parameters and setup cells, then the model load, on the `smoke` profile with one thread (as jobs run), into a
temporary folder; the fastest of REPEATS runs is reported (the first run also warms the file cache). Beside it,
the same with the kernel forked from a warm server (persona_em.kernels), the same with papermill forked too (the
command a workflow job runs, `python -m persona_em.kernels --papermill`), and the same notebook as the second of
two in one kernel (its namespace reset first): what a job that runs several conditions' notebooks in one kernel
would pay per notebook after the first. Each figure is the whole papermill run, the kernel's shutdown included.

    .venv/bin/python benchmarks/run_overhead.py [REPEATS]

Writes benchmarks/results/run_overhead.csv (`record`'s format); the ratio is against the 4 s a run should
cost before its work starts.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from record import write

from persona_em.kernels import THREAD_VARS, Servers

ROOT = Path(__file__).resolve().parents[1]
repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 2
TARGET = 4.0
CHAPTERS = ["01_generate", "02_train_character", "03_induce_em", "04_evaluate", "05_analyze"]
LOAD = "model, tok = models.load_model(P.model, hw=P.hardware)"


def truncated(chapter: str, with_setup: bool) -> nbformat.NotebookNode:
    """The chapter's parameters cell, its setup cell and the model load; or (with_setup False) one empty cell."""
    nb = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not with_setup:
        nb.cells = [nbformat.v4.new_code_cell("pass")]
        return nb
    loads = chapter != "05_analyze" and "models.load_model" not in code[1].source   # chapter 4's setup loads it
    nb.cells = code[:2] + ([nbformat.v4.new_code_cell(LOAD)] if loads else [])
    return nb


PAPERMILL = ["-m", "papermill"]
JOB = ["-m", "persona_em.kernels", "--papermill"]   # a workflow job's command: papermill forked where it can be


def run(nb: nbformat.NotebookNode, work: Path, params: dict, env: dict,
        command: list[str] = PAPERMILL) -> tuple[float, list[float]]:
    """Wall seconds of `python -m papermill` (or `command`) on it, and papermill's duration of each cell."""
    src, out = work / "in.ipynb", work / "out.ipynb"
    nbformat.write(nb, src)
    args = [a for k, v in params.items() for a in ("-p", k, str(v))]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *command, str(src), str(out), "-k", "persona-em", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if "persona_em.kernels: " in done.stderr and env is WARM:
        raise SystemExit(f"the warm kernel or papermill run was refused:\n{done.stderr[-3000:]}")
    if done.returncode != 0:
        raise SystemExit(f"papermill failed on the truncated {src.name}:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    cells = json.loads(out.read_text())["cells"]
    return wall, [c["metadata"].get("papermill", {}).get("duration") or 0.0 for c in cells]


def run_warm(nb: nbformat.NotebookNode, work: Path, params: dict) -> float:
    """Wall seconds of the same notebook as the second of two run one after the other in one kernel (papermill's
    API, the kernel manager passed in and kept: a grouped job), its namespace cleared first: imports done, the
    model's file in memory."""
    import papermill
    from jupyter_client.manager import KernelManager

    src = work / "in.ipynb"
    nb = nbformat.from_dict(nb)
    nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))
    nbformat.write(nb, src)
    km = KernelManager(kernel_name="persona-em")
    km.start_kernel(cwd=str(ROOT), env=COLD)
    try:
        walls = []
        for i in range(2):
            t0 = time.perf_counter()
            papermill.execute_notebook(str(src), str(work / f"warm{i}.ipynb"), parameters=params, km=km,
                                       kernel_name="persona-em", progress_bar=False, cwd=str(ROOT))
            walls.append(time.perf_counter() - t0)
    finally:
        km.shutdown_kernel(now=True)
    return walls[1]


rows = []
# one thread, as Snakemake gives a one-thread job (its thread variables) and the fork server that serves it
os.environ.update({k: "1" for k in THREAD_VARS})
COLD = dict(os.environ)
servers = Servers([1])   # sets PERSONA_EM_KERNELS in this process's environment: the forked runs' environment
WARM = dict(os.environ)
with tempfile.TemporaryDirectory() as d:
    work = Path(d)
    params = {"profile_path": str(ROOT / "params" / "smoke.yaml"), "root": str(work / "root"), "threads": 1}
    # chapter 4 evaluates the untrained base: its character run's record says "no adapter"
    base = work / "root" / "runs" / "smoke" / "02_train_character" / "base"
    base.mkdir(parents=True)
    (base / "model.json").write_text(json.dumps({"adapter": None}))
    (work / "root" / "PREREGISTRATION.md").symlink_to(ROOT / "PREREGISTRATION.md")   # chapter 5 records it
    empty = min(run(truncated("05_analyze", False), work, {}, COLD)[0] for _ in range(repeats))
    run(truncated("05_analyze", False), work, {}, WARM)   # waits for the server's imports
    for chapter in CHAPTERS:
        best = min((run(truncated(chapter, True), work, params, COLD) for _ in range(repeats)), key=lambda r: r[0])
        wall, cells = best
        setup, load = cells[2], (cells[3] if len(cells) > 3 else 0.0)   # after papermill's injected parameters
        forked = min(run(truncated(chapter, True), work, params, WARM)[0] for _ in range(repeats))
        job = min(run(truncated(chapter, True), work, params, WARM, JOB)[0] for _ in range(repeats))
        warm = min(run_warm(truncated(chapter, True), work, params) for _ in range(repeats))
        rows.append({"chapter": chapter, "seconds_to_work": round(wall, 2), "python_papermill_kernel": round(empty, 2),
                     "setup_cell": round(setup, 2), "model_load": round(load, 2),
                     "other": round(wall - empty - setup - load, 2), "forked_kernel": round(forked, 2),
                     "forked_job": round(job, 2), "warm_kernel": round(warm, 2)})
        print(rows[-1], flush=True)
servers.stop()
parts = ("python_papermill_kernel", "setup_cell", "model_load", "other")
dest = write("run_overhead", [
    {"figure": f"overhead: {r['chapter']}, papermill start to work ({', '.join(f'{p} {r[p]:.1f} s' for p in parts)}"
               + ("; the setup cell loads the model" if r["chapter"] == "04_evaluate" else "") + ")",
     "value": r["seconds_to_work"], "unit": "s", "ratio": r["seconds_to_work"] / TARGET, "against": "4 s target"}
    for r in rows] + [
    {"figure": f"overhead: {r['chapter']}, papermill start to work, the kernel forked from a warm server",
     "value": r["forked_kernel"], "unit": "s", "ratio": r["forked_kernel"] / TARGET, "against": "4 s target"}
    for r in rows] + [
    {"figure": f"overhead: {r['chapter']}, job start to work, papermill and the kernel forked from a warm server "
               "(a workflow run's jobs)",
     "value": r["forked_job"], "unit": "s", "ratio": r["forked_job"] / TARGET, "against": "4 s target"}
    for r in rows] + [
    {"figure": f"overhead: {r['chapter']}, a second run in the same kernel (a grouped job)",
     "value": r["warm_kernel"], "unit": "s", "ratio": r["warm_kernel"] / TARGET, "against": "4 s target"}
    for r in rows])
print(f"\n{'chapter':20s} {'to work':>8s} {'kernel':>7s} {'setup':>7s} {'load':>7s} {'other':>7s} {'forked':>7s} "
      f"{'job':>7s} {'warm':>7s}")
for r in rows:
    print(f"{r['chapter']:20s} {r['seconds_to_work']:8.1f} {r['python_papermill_kernel']:7.1f} {r['setup_cell']:7.1f} "
          f"{r['model_load']:7.1f} {r['other']:7.1f} {r['forked_kernel']:7.1f} {r['forked_job']:7.1f} "
          f"{r['warm_kernel']:7.1f}")
print(f"wrote {dest}")
