"""The runner `make reproduce` uses: a lock left by a dead run is cleared, a live run refuses a second one, and
the lock lives as long as Snakemake itself (the runner becomes Snakemake)."""
import fcntl
import os
import signal
import subprocess
import sys
import time


def test_stale_snakemake_lock_is_cleared_and_snakemake_runs(tmp_path):
    (tmp_path / ".snakemake" / "locks").mkdir(parents=True)
    (tmp_path / ".snakemake" / "locks" / "0.input.lock").write_text("left by a killed run")
    r = subprocess.run([sys.executable, "-m", "persona_em", "run", "--version"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip()[0].isdigit(), r.stderr   # Snakemake's version
    assert "cleared 1 Snakemake lock file(s)" in r.stderr
    assert not list((tmp_path / ".snakemake" / "locks").iterdir())


def test_a_live_run_keeps_the_lock_and_refuses_a_second(tmp_path):
    (tmp_path / "Snakefile").write_text("rule all:\n    shell: 'sleep 30'\n")
    first = subprocess.Popen([sys.executable, "-m", "persona_em", "run", "--cores", "1"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lock = tmp_path / ".snakemake" / "persona-em.lock"
        for _ in range(200):   # until the first run holds the lock
            if lock.exists() and lock.read_text().startswith("pid"):
                break
            time.sleep(0.1)
        assert lock.read_text().startswith(f"pid {first.pid},")   # the runner's pid is Snakemake's (exec)
        second = subprocess.run([sys.executable, "-m", "persona_em", "run", "--cores", "1"], cwd=tmp_path,
                                capture_output=True, text=True)
        assert second.returncode == 3 and "another run of this folder is in progress" in second.stderr
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = False
            except BlockingIOError:
                held = True
        assert held
    finally:
        os.killpg(first.pid, signal.SIGKILL)   # Snakemake and its job, as a kill of `make reproduce` does
        first.wait()
    with open(lock) as f:   # the kernel dropped it with the process
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_chapters_kernel_is_registered_for_this_python_when_missing(tmp_path, monkeypatch):
    """A conda environment has no `persona-em` kernel until the runner registers one for its own Python."""
    import json

    from persona_em.runner import ensure_kernel

    name = "persona-em-test-registration"
    note = ensure_kernel(name, prefix=str(tmp_path))
    spec = json.loads((tmp_path / "share" / "jupyter" / "kernels" / name / "kernel.json").read_text())
    assert "registered the Jupyter kernel" in note and spec["argv"][0] == sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    assert ensure_kernel(name, prefix=str(tmp_path)) is None   # found now: nothing to do


def test_a_chapters_kernel_without_the_warm_start_is_re_registered(tmp_path, monkeypatch):
    """A `persona-em` kernel registered as a plain ipykernel for this Python (an older set-up) is rewritten to
    start through persona_em.kernels, which the workflow's warm kernels need."""
    import json

    name = "persona-em-test-upgrade"
    folder = tmp_path / "share" / "jupyter" / "kernels" / name
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                                              "{connection_file}"], "display_name": name,
                                                     "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    from persona_em.runner import ensure_kernel

    assert "re-registered" in ensure_kernel(name, prefix=str(tmp_path))
    argv = json.loads((folder / "kernel.json").read_text())["argv"]
    assert argv[0] == sys.executable and argv[argv.index("-m") + 1] == "persona_em.kernels"
    assert ensure_kernel(name, prefix=str(tmp_path)) is None
