"""The chapters' kernel started warm (persona_em.kernels): forked from a server that imported the libraries,
through papermill and the registered kernel spec as a workflow job starts it; refused, and started cold, where the
job's environment is not the server's; and never left running when its launcher dies."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from persona_em import kernels

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm kernels are Linux's only")]

PROBE = """import gc, json, os, sys
preloaded = "torch" in sys.modules and "persona_em.evaluate" in sys.modules
import matplotlib, torch
print("PROBE " + json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "preloaded": preloaded,
      "backend": matplotlib.get_backend(), "cwd": os.getcwd(), "seed": torch.initial_seed(),
      "threads_var": os.environ.get("OMP_NUM_THREADS"), "mark": os.environ.get("PERSONA_EM_TEST_MARK"),
      "kernel": __import__("persona_em.provenance").provenance.kernel_start(), "own_session": os.getsid(0) == os.getpid(),
      "frozen": gc.get_freeze_count(), "collected": len(gc.get_objects())}))
"""


@pytest.fixture(scope="module")
def server():
    """A run's fork server for one-thread kernels, as the Snakefile starts it (the environment of its jobs)."""
    saved = dict(os.environ)
    os.environ.update({k: "1" for k in kernels.THREAD_VARS}, PERSONA_EM_TEST_MARK="server")
    servers = kernels.Servers([1], run=f"test{os.getpid()}")
    env = dict(os.environ)
    try:
        yield servers, env
    finally:
        servers.stop()
        os.environ.clear()
        os.environ.update(saved)


def _papermill(tmp_path, code: str, env: dict, name: str = "probe") -> tuple[subprocess.CompletedProcess, dict]:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code)]
    src = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, src)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "papermill", str(src), str(tmp_path / f"{name}.out.ipynb"),
                           "-k", "persona-em", "--cwd", str(work), "--log-output"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stderr.splitlines() if x.startswith("PROBE "))
    return done, json.loads(line[len("PROBE "):])


def _said(done: subprocess.CompletedProcess) -> list[str]:
    """What the kernel launcher told the job's log (why a kernel started cold)."""
    return [x for x in done.stderr.splitlines() if x.startswith("persona_em.kernels:")]


def test_a_job_kernel_is_forked_warm_and_starts_as_a_cold_one(server, tmp_path):
    servers, env = server
    (_, first), (_, second) = _papermill(tmp_path, PROBE, env), _papermill(tmp_path, PROBE, env, "again")
    pids = {p.pid for p in servers.procs}
    assert first["ppid"] in pids and second["ppid"] in pids   # forked by the server ...
    assert first["preloaded"] and second["preloaded"]          # ... with the libraries already imported
    assert first["backend"] == "module://matplotlib_inline.backend_inline"   # figures inline, as in a cold kernel
    assert first["cwd"] == str(tmp_path / "work") and first["threads_var"] == "1" and first["mark"] == "server"
    assert first["seed"] != second["seed"]   # each kernel draws its own unseeded random state, as new processes do
    assert first["kernel"] == "warm"   # what its manifest records
    assert first["own_session"]   # a session of its own, as Jupyter starts a kernel
    # the preloaded libraries' objects are out of the collector's reach: a full collection walks the kernel's own
    assert first["frozen"] > 100_000 and first["frozen"] > 2 * first["collected"]
    cold_env = {k: v for k, v in env.items() if k != kernels.ENV}
    done, cold = _papermill(tmp_path, PROBE, cold_env, "cold")
    assert cold["ppid"] not in pids and not cold["preloaded"] and "a cold kernel" not in done.stderr
    assert cold["kernel"] == "cold" and cold["frozen"] == 0
    assert cold["backend"] == first["backend"]


COMPUTE = """import hashlib, json, torch
from persona_em import models, sampling
models.set_threads(1)
model, tok = models.load_model("smollm2-135m")
replies = sampling.generate(model, tok, [[{"role": "user", "content": "Name a colour."}]] * 2, 8, seed=3)
batch = tok(["A sentence to train on."], return_tensors="pt")
out = model(**batch, labels=batch.input_ids)
out.loss.backward()
grad = model.model.layers[0].mlp.down_proj.weight.grad
print("PROBE " + json.dumps({"replies": [r["text"] for r in replies], "loss": out.loss.item(),
      "grad": hashlib.sha256(grad.numpy().tobytes()).hexdigest(),
      "kernel": __import__("persona_em.provenance").provenance.kernel_start()}))
"""


def test_the_embedded_model_computes_the_same_in_a_warm_and_a_cold_kernel(server, tmp_path):
    """Seeded sampling, a loss and its gradient, bit for bit: what a chapter computes does not depend on how its
    kernel started."""
    servers, env = server
    warm_run, warm = _papermill(tmp_path, COMPUTE, env, "warm")
    cold_run, cold = _papermill(tmp_path, COMPUTE, {k: v for k, v in env.items() if k != kernels.ENV}, "cold")
    assert (warm.pop("kernel"), cold.pop("kernel")) == ("warm", "cold"), _said(warm_run) + _said(cold_run)
    assert warm == cold and warm["replies"][0]


def test_a_job_whose_environment_differs_gets_a_cold_kernel(server, tmp_path):
    servers, env = server
    done, probe = _papermill(tmp_path, PROBE, {**env, "PERSONA_EM_TEST_MARK": "job"})
    said = "a cold kernel (its environment differs from the fork server's in PERSONA_EM_TEST_MARK)"
    assert said in done.stderr, (_said(done), "server exit codes", [p.poll() for p in servers.procs])
    assert probe["ppid"] not in {p.pid for p in servers.procs} and probe["mark"] == "job"
    done, probe = _papermill(tmp_path, PROBE, {**env, "OMP_NUM_THREADS": "2"})   # no server for 2 threads
    assert "a cold kernel (no fork server" in done.stderr and probe["threads_var"] == "2", _said(done)


SLEEPER = """import os, pathlib, signal, subprocess, time
child = subprocess.Popen(["sleep", "600"])   # a process of the kernel's group, as a training launch makes
signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({term!r}).write_text("TERM"), os._exit(0)))
pathlib.Path({ready!r}).write_text(str(child.pid))
time.sleep(600)
"""


def _sleeping_job(tmp_path, env: dict, server) -> tuple[subprocess.Popen, psutil.Process, psutil.Process]:
    """A papermill job whose cell starts a child and sleeps, and (once the cell runs) its kernel, the kernel's
    launcher and the child."""
    nb = nbformat.v4.new_notebook()
    ready, term = tmp_path / "ready", tmp_path / "term"
    nb.cells = [nbformat.v4.new_code_cell(SLEEPER.format(ready=str(ready), term=str(term)))]
    src = tmp_path / "sleep.ipynb"
    nbformat.write(nb, src)
    job = subprocess.Popen([sys.executable, "-m", "papermill", str(src), str(tmp_path / "out.ipynb"), "-k",
                            "persona-em"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server_proc = psutil.Process(server.pid)
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert ready.exists() and len(server_proc.children()) == 1, "no forked kernel ran the job's cell in 120 s"
    kernel = server_proc.children()[0]
    launcher = next(p for p in psutil.Process(job.pid).children() if "persona_em.kernels" in p.cmdline())
    return job, kernel, launcher, psutil.Process(int(ready.read_text()))


@pytest.mark.parametrize("killed", ["launcher", "job", "server", "forwarded"])
def test_a_kernel_never_outlives_its_launcher_its_job_or_its_server(server, tmp_path, killed):
    """SIGKILL to the launcher, the papermill job or the server ends the kernel; a SIGTERM the launcher gets is
    the kernel's ("forwarded")."""
    servers, env = server
    if killed == "server":   # a server of its own, so that the other tests keep theirs
        os.environ.update(env)
        servers = kernels.Servers([1], run=f"test{os.getpid()}-killed")
        env = dict(os.environ)
    job, kernel, launcher, child = _sleeping_job(tmp_path, env, servers.procs[0])
    try:
        victim = {"launcher": launcher, "job": psutil.Process(job.pid), "server": psutil.Process(servers.procs[0].pid),
                  "forwarded": launcher}
        victim[killed].send_signal(signal.SIGTERM if killed == "forwarded" else signal.SIGKILL)
        kernel.wait(timeout=10)   # raises if the kernel outlives it
        launcher.wait(timeout=10)
        if killed == "forwarded":   # the kernel's own handler ran: the signal reached it, not only the launcher
            assert (tmp_path / "term").read_text() == "TERM"
        elif killed != "server":   # the server kills the kernel's group, as Jupyter kills a cold kernel's:
            child.wait(timeout=10)  # nothing it started is left behind (a SIGKILLed server kills nothing)
    finally:
        job.kill()
        job.wait()
        if child.is_running():
            child.kill()
        if killed == "server":
            servers.stop()


# where the papermill process that started this kernel came from: a forked kernel's launcher holds the same
# connection file on its command line, and the launcher's parent is papermill; a cold kernel is its own launcher
LINEAGE = """import json, os, sys, psutil
conn = sys.argv[sys.argv.index("-f") + 1]
launcher = next((p for p in psutil.process_iter(["cmdline"])
                 if p.pid != os.getpid() and conn in (p.info["cmdline"] or [])), psutil.Process())
job = launcher.parent()
print("PROBE " + json.dumps({"papermill": job.pid, "papermill_parent": job.ppid(), "kernel_parent": os.getppid(),
      "kernel": __import__("persona_em.provenance").provenance.kernel_start()}))
"""


def _papermill_job(tmp_path, code: str, env: dict, name: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A workflow job's command: `python -m persona_em.kernels --papermill` on a one-cell notebook."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code)]
    src, out = tmp_path / f"{name}.ipynb", tmp_path / f"{name}.out.ipynb"
    nbformat.write(nb, src)
    done = subprocess.run([sys.executable, "-m", "persona_em.kernels", "--papermill", str(src), str(out),
                           "-k", "persona-em", "--log-output"], env=env, capture_output=True, text=True, timeout=300)
    return done, out


def _probe(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(x for x in done.stderr.splitlines() if x.startswith("PROBE "))[len("PROBE "):])


def test_a_job_papermill_run_is_forked_warm_and_runs_as_a_cold_one(server, tmp_path):
    """The job's papermill run is a fork of the server, in the job's environment as it came (so its kernel is
    forked too, not refused); without a server it is a plain `python -m papermill`, and the notebook it writes is
    the same."""
    servers, env = server
    pids = {p.pid for p in servers.procs}
    done, out = _papermill_job(tmp_path, LINEAGE, env, "warm")
    warm = _probe(done)
    assert warm["papermill_parent"] in pids and warm["kernel_parent"] in pids, warm
    # its kernel was not refused: papermill's environment is the job's, without what the chapters' libraries set
    # in the server's as they were imported
    assert warm["kernel"] == "warm" and not _said(done)
    cold_done, cold_out = _papermill_job(tmp_path, LINEAGE, {k: v for k, v in env.items() if k != kernels.ENV},
                                         "cold")
    cold = _probe(cold_done)
    assert cold["papermill_parent"] == os.getpid() and cold["kernel"] == "cold"
    warm_nb, cold_nb = nbformat.read(out, as_version=4), nbformat.read(cold_out, as_version=4)
    assert warm_nb.metadata.papermill.keys() == cold_nb.metadata.papermill.keys()
    assert [c.metadata.get("tags") for c in warm_nb.cells] == [c.metadata.get("tags") for c in cold_nb.cells]


def test_a_failing_notebook_fails_its_job_as_papermill_does(server, tmp_path):
    """Papermill's exit status, report and half-run notebook, from a forked run as from a cold one."""
    servers, env = server
    for name, job_env in (("warm", env), ("cold", {k: v for k, v in env.items() if k != kernels.ENV})):
        done, out = _papermill_job(tmp_path, LINEAGE + "raise ValueError('the cell failed')", job_env, name)
        assert done.returncode == 1, (name, done.stderr[-2000:])
        assert "PapermillExecutionError" in done.stderr and "the cell failed" in done.stderr
        assert nbformat.read(out, as_version=4).cells[-1].outputs[-1].ename == "ValueError"
        lineage = json.loads(next(x for x in done.stderr.splitlines() if x.startswith("PROBE "))[len("PROBE "):])
        forked = lineage["papermill_parent"] in {p.pid for p in servers.procs}
        assert forked == (name == "warm") and not _said(done), (name, lineage, _said(done))


def test_a_forked_papermill_reads_the_job_s_streams(server, tmp_path):
    """Papermill decides from its standard input whether it reads the notebook from a pipe; a forked run decides
    from the job's, not the server's: with the notebook piped in and one path given (the output), it runs the
    piped notebook, as `python -m papermill` does."""
    servers, env = server
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(6 * 7)")]
    for name, job_env in (("warm", env), ("cold", {k: v for k, v in env.items() if k != kernels.ENV})):
        out = tmp_path / f"{name}.out.ipynb"
        done = subprocess.run([sys.executable, "-m", "persona_em.kernels", "--papermill", str(out), "-k",
                               "persona-em"], input=nbformat.writes(nb), env=job_env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and not _said(done), (name, done.stderr[-2000:])
        assert nbformat.read(out, as_version=4).cells[0].outputs[0].text == "42\n"


def test_a_forked_papermill_run_and_its_kernel_end_with_their_job(server, tmp_path):
    """SIGKILL to the job's shell (what Snakemake's cancel does to a job) ends its launcher, the forked papermill
    run, its kernel and what the kernel started."""
    servers, env = server
    nb = nbformat.v4.new_notebook()
    ready, term = tmp_path / "ready", tmp_path / "term"
    nb.cells = [nbformat.v4.new_code_cell(SLEEPER.format(ready=str(ready), term=str(term)))]
    nbformat.write(nb, tmp_path / "sleep.ipynb")
    command = (f"{sys.executable} -m persona_em.kernels --papermill {tmp_path / 'sleep.ipynb'} "
               f"{tmp_path / 'out.ipynb'} -k persona-em; true")   # `; true`: bash waits, as a job's shell does
    job = subprocess.Popen(["bash", "-c", command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.2)
    try:
        assert ready.exists(), "no forked kernel ran the job's cell in 120 s"
        child = psutil.Process(int(ready.read_text()))
        kernel = child.parent()
        forks = [p for p in psutil.Process(servers.procs[0].pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        papermill = next((p for p in forks if p.pid != kernel.pid), None)
        assert kernel in forks and papermill is not None and len(forks) == 2, forks
        launcher = next(p for p in psutil.Process(job.pid).children() if "--papermill" in p.cmdline())
        psutil.Process(job.pid).send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)   # raises if any of them outlives the job
        papermill.wait(timeout=10)
        kernel.wait(timeout=10)
        child.wait(timeout=10)
    finally:
        job.kill()
        job.wait()
        for p in psutil.Process(servers.procs[0].pid).children(recursive=True):
            p.kill()
