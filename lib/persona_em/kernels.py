"""The chapters' Jupyter kernel, started warm: a fork server that has imported the libraries once.

Every Snakemake job executes one chapter in a fresh kernel, a new Python that imports torch, transformers, peft
and trl before its first line of work: 9-16 s of each job on 2 cores, for jobs whose own work takes 10-60 s
(`benchmarks/run_overhead.py`). During a workflow run the Snakefile therefore starts a fork server: one process
that imports those libraries (and this package, and papermill) and then forks, for each job that asks, its
papermill run and its kernel. Every job still gets processes of its own with a fresh namespace, and every job
starts from the same state, the one a new Python reaches by importing the same modules: nothing has run yet (no
model loaded, no random number drawn, no parallel region entered), and the unseeded random states are drawn
afresh in each fork. So a chapter computes what it computes in a cold kernel, and each run keeps its executed
notebook, log and manifest. What a fork does share with its server: the string hash seed, the command line `ps`
shows, and the warning filters the preloaded libraries set (in a forked papermill, which only reports).

How a job starts. The Snakefile runs `python -m persona_em.kernels --papermill ARGS` for `python -m papermill
ARGS`, and the `persona-em` kernel spec runs `python -m persona_em.kernels -f CONNECTION_FILE`. Where the
environment names a run's fork servers (PERSONA_EM_KERNELS) and one serves this job's thread count, this
launcher sends the server its command line, working folder, environment and standard streams; the server forks
papermill or the kernel, which takes them over in a session of its own (as Jupyter starts a cold kernel). The
launcher stays as the fork's stand-in: signals it receives (an interrupt, a shutdown) go to the fork's process
group, it exits with the fork's exit status, and if it or the process that started it dies, the server kills the
fork's group; a fork dies with its server. The server forks only for a job whose Python, interpreter options (a
kernel's) and environment are its own (per-job variables set by Jupyter and the shell apart): an environment
variable read at import time would otherwise be the server's. Anywhere else (Jupyter, the tour, a run without a
server, a refused job) the launcher becomes a plain ipykernel or papermill, at the usual cost. The servers listen
on Linux abstract sockets (no file to leave behind) named with a random token, and each side checks that the
other runs as its own user; on other systems, and for GPU runs, every job starts cold.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

ENV = "PERSONA_EM_KERNELS"   # the run whose fork servers a job asks (one per thread count)
FORKED = "PERSONA_EM_KERNEL_FORKED"   # set in a forked kernel (the server's pid): its manifest says "warm"
# What the modules preloaded: papermill (first: its imports change nothing in the environment, and a forked
# papermill run gets the job's environment as it came), ipykernel and the chapters' libraries; never matplotlib
# (its backend is chosen when it is first imported, and a kernel chooses the inline one) and nothing that starts a
# Python thread or initialises CUDA (a fork keeps only the forking thread; the native pools that start at import,
# OpenBLAS's and jemalloc's, restart themselves in a forked child, and torch's OpenMP pool starts at its first
# parallel region, in the kernel).
PRELOAD = ("papermill.cli", "ipykernel.kernelapp", "numpy", "pandas", "torch", "transformers",
           "transformers.models.llama.modeling_llama", "peft", "trl", "sentence_transformers",
           "statsmodels.formula.api", "persona_em.analysis", "persona_em.direction", "persona_em.em",
           "persona_em.judge", "persona_em.pairs", "persona_em.scorer", "persona_em.diversity",
           "persona_em.forgetting", "persona_em.provenance")
# What a server forks, and the module a new Python runs instead where it does not: a job's kernel, and the job's
# papermill run (its imports cost 1-1.5 s a job)
ROLES = {"kernel": "ipykernel_launcher", "papermill": "papermill"}
# Set per job by Jupyter, papermill and the shell, and not read while the server imports (ipykernel reads
# JPY_PARENT_PID then, which is why each kernel is given its parent explicitly).
PER_JOB = {"JPY_PARENT_PID", "JPY_SESSION_NAME", "PYDEVD_IPYTHON_COMPATIBLE_DEBUGGING",
           "PYDEVD_DISABLE_FILE_VALIDATION", "PWD", "OLDPWD", "SHLVL", "_", "PERSONA_EM_PROFILE", ENV}
# What Snakemake sets in each job's environment: the thread variables (the job's threads) and the temporary
# folder variables (its tmpdir resource)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
TMPDIR_VARS = ("TMPDIR", "TMP", "TEMPDIR", "TEMP")


# seconds a launcher waits for its fork (the server may still be importing) before it starts cold: for a kernel,
# well within the 60 s papermill gives a kernel to start
START_LIMIT = 40
MAX_REQUEST = 1 << 24   # bytes: a job's command line, folder and environment


def address(run: str, threads: int | str) -> str:
    """The abstract socket (Linux) of run `run`'s fork server for kernels of `threads` threads."""
    return f"\0persona-em-kernels-{run}-{int(threads)}"


def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    frame = struct.pack("!I", len(data)) + data
    sent = socket.send_fds(conn, [frame], fds) if fds else 0
    conn.sendall(frame[sent:])


def _recv(conn: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One framed JSON object (None at end of stream) and the descriptors that came with its first bytes; on any
    error the descriptors are closed and the error raised."""
    fds = []
    try:
        if max_fds:
            head, fds, _, _ = socket.recv_fds(conn, 4, max_fds)
        else:
            head = conn.recv(4)
        while head and len(head) < 4:
            more = conn.recv(4 - len(head))
            if not more:
                break
            head += more
        if len(head) < 4:
            return None, fds
        size, = struct.unpack("!I", head)
        if size > MAX_REQUEST:
            raise ValueError(f"a message of {size} bytes")
        data = b""
        while len(data) < size:
            more = conn.recv(size - len(data))
            if not more:
                return None, fds
            data += more
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
        return message, fds
    except BaseException:
        _close(fds)
        raise


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _peer_uid(conn: socket.socket) -> int:
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]


def _kill(pid: int, signum: int = signal.SIGKILL) -> None:
    """`signum` to a fork's process group (its own session), or to the fork alone before it made one."""
    try:
        os.killpg(pid, signum)
    except OSError:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


# --- the launcher: what the kernel spec runs --------------------------------------------------------------------

def launch(argv: list[str], role: str = "kernel") -> int:
    """Start a job's kernel (`argv`: ipykernel's, a connection file) or its papermill run (`argv`: papermill's
    command line): forked by the run's server where it takes this job, else exec'd as a new Python."""
    run = os.environ.get(ENV)
    what = "a cold kernel" if role == "kernel" else "papermill started cold"
    if run and sys.platform.startswith("linux"):
        job = os.getppid()   # the papermill process (or Jupyter) that started this kernel; the job's shell
        try:
            conn, pid = _request(address(run, os.environ.get("OMP_NUM_THREADS") or 0), role, argv, job)
        except _Refused as e:
            print(f"persona_em.kernels: {what} ({e})", file=sys.stderr, flush=True)
        except (OSError, ValueError) as e:   # no server for this thread count, or it is gone
            print(f"persona_em.kernels: {what} (no fork server: {e})", file=sys.stderr, flush=True)
        else:
            return _stand_in(conn, pid, job) if pid else 1   # pid None: the job died while we waited
    if role == "kernel":   # a workflow started from a warm kernel passes it on; this kernel is cold
        os.environ.pop(FORKED, None)
    cmd = [sys.executable, *(f"-X{k}" if v is True else f"-X{k}={v}" for k, v in sys._xoptions.items()),
           "-m", ROLES[role], *argv]
    os.execv(sys.executable, cmd)   # never returns


class _Refused(RuntimeError):
    pass


def _request(where: str, role: str, argv: list[str], job: int) -> tuple[socket.socket, int | None]:
    """Ask the server at `where` to fork this job's kernel or papermill run; the connection and the fork's pid."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(where)
    if _peer_uid(conn) != os.getuid():
        raise _Refused("the socket's server runs as another user")
    _send(conn, {"role": role, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "executable": sys.executable,
                 "xoptions": sys._xoptions}, [0, 1, 2])
    start = time.monotonic()
    while not select.select([conn], [], [], 1.0)[0]:
        if os.getppid() != job:
            return conn, None
        if time.monotonic() - start > START_LIMIT:
            raise _Refused(f"no answer from the fork server in {START_LIMIT} s")
    reply, _ = _recv(conn)
    if reply is None or not isinstance(reply.get("pid"), int):
        raise _Refused((reply or {}).get("refused", "the fork server closed the connection"))
    return conn, reply["pid"]


def _stand_in(conn: socket.socket, pid: int, job: int) -> int:
    """Be the fork (for Jupyter, the kernel; for the job's shell, papermill) until it exits: forward signals to
    its group, return its exit status; if the process that started us dies first, leave (the server then kills
    the fork's group), as a cold ipykernel watches its parent. So a forked papermill ends within a second of its
    job's shell, where a cold one would run on as an orphan."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, lambda signum, _frame: _kill(pid, signum))
    while not select.select([conn], [], [], 1.0)[0]:
        if os.getppid() != job:
            return 1
    try:
        done, _ = _recv(conn)
    except (OSError, ValueError):
        done = None
    if done is None or not isinstance(done.get("exit"), int):   # the server died, and its kernels with it
        return 1
    return done["exit"] if done["exit"] >= 0 else 128 - done["exit"]   # killed by a signal: as a shell says it


# --- the server ---------------------------------------------------------------------------------------------

def serve(where: str, parent: int) -> None:
    """Bind `where`, import PRELOAD, then fork a kernel or papermill run for each launcher that connects, until
    process `parent` (the workflow that started the server) is gone."""
    import gc
    import selectors
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(where)   # bound before the imports: a launcher that connects meanwhile waits in the backlog
    listener.listen(64)
    _die_with_parent()
    import importlib

    env = dict(os.environ)   # what the jobs' environments are compared with
    for name in PRELOAD:
        importlib.import_module(name)
    # what the imports did to the environment, done again to each kernel's (as its own imports would)
    imported = ({k: v for k, v in os.environ.items() if env.get(k) != v}, set(env) - set(os.environ))
    import torch

    if threading.active_count() > 1 or "matplotlib" in sys.modules or torch.cuda.is_initialized():
        listener.close()
        raise SystemExit("persona_em.kernels: the preloaded modules started a thread, imported matplotlib or "
                         "initialised CUDA; no warm kernels (every job starts a cold one)")
    # The preloaded modules' objects (about 540,000) live as long as a kernel does: out of the cyclic collector's
    # reach, a kernel's full collections (IPython's reset at shutdown, the libraries' own gc.collect calls) skip
    # them, 0.4 s or more each, and do not write to, and so copy, the memory pages the kernels share with the
    # server. The kernel's own garbage is collected as in a cold kernel; what is never freed is a cycle that runs
    # through a preloaded object, which changes memory, not results.
    gc.collect()
    gc.freeze()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False), wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)   # wakes the selector through the wakeup descriptor
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    kernels: dict[int, socket.socket] = {}   # kernel pid -> its launcher's connection
    owners: dict[socket.socket, int] = {}
    try:
        while os.getppid() == parent:
            for key, _ in sel.select(timeout=1.0):
                if key.data == "accept":
                    try:
                        conn, _ = listener.accept()
                    except OSError as e:   # e.g. out of descriptors: the launcher waits, or starts cold
                        print(f"persona_em.kernels: accept failed: {e!r}", file=sys.stderr, flush=True)
                        continue
                    try:
                        pid = _fork_for(conn, env, imported, [listener, wake_r, wake_w, sel, *owners])
                    except Exception as e:   # one bad request never ends the server
                        print(f"persona_em.kernels: a request failed: {e!r}", file=sys.stderr, flush=True)
                        pid = None
                    if pid:
                        kernels[pid], owners[conn] = conn, pid
                        sel.register(conn, selectors.EVENT_READ, "launcher")
                    else:
                        conn.close()
                elif key.data == "child":   # reaped below
                    try:
                        while wake_r.recv(512):
                            pass
                    except BlockingIOError:
                        pass
                else:   # a launcher's end: data never comes, so this is its exit (killed): kill its kernel
                    conn = key.fileobj
                    sel.unregister(conn)
                    pid = owners.pop(conn)
                    kernels.pop(pid, None)
                    conn.close()
                    _kill(pid)
            _reap(kernels, owners, sel)
    finally:
        for pid in list(kernels):
            _kill(pid)
        listener.close()


def _reap(kernels: dict, owners: dict, sel) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = kernels.pop(pid, None)
        if conn is not None:
            owners.pop(conn, None)
            sel.unregister(conn)
            try:
                _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
            except OSError:
                pass
            conn.close()


def _refusal(request: dict, env: dict) -> str | None:
    if (not isinstance(request.get("env"), dict) or not isinstance(request.get("argv"), list)
            or not isinstance(request.get("role"), str) or request["role"] not in ROLES):
        return "a malformed request"
    if request.get("executable") != sys.executable:
        return f"the job's Python is {request.get('executable')}, the server's {sys.executable}"
    # a kernel's interpreter options are its spec's, which the server runs with (ipykernel's -Xfrozen_modules=off);
    # a papermill run's command line gives none (the Snakefile's), and the fork runs with the server's
    if request["role"] == "kernel" and request.get("xoptions") != sys._xoptions:
        return "the job's -X options are not the server's"
    theirs = request["env"]
    differ = sorted(k for k in set(theirs) | set(env) if k not in PER_JOB and theirs.get(k) != env.get(k))
    if differ:
        return "its environment differs from the fork server's in " + ", ".join(differ)
    return None


def _closed(conn: socket.socket) -> bool:
    """Whether the peer has closed `conn` (a launcher sends nothing after its request)."""
    timeout = conn.gettimeout()
    conn.setblocking(False)   # a socket with a timeout would wait for data that never comes
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    finally:
        conn.settimeout(timeout)


def _fork_for(conn: socket.socket, env: dict, imported: tuple, inherited: list) -> int | None:
    """Fork what the launcher on `conn` asks for; its pid, or None (refused, or the launcher already gone)."""
    if _peer_uid(conn) != os.getuid():   # before reading a byte: only this user's jobs
        return None
    conn.settimeout(5.0)   # a launcher sends its request at once; a silent peer must not hold the server
    fds = []
    try:
        request, fds = _recv(conn, max_fds=3)
        refused = "an incomplete request" if request is None or len(fds) != 3 else _refusal(request, env)
        if refused:
            _send(conn, {"refused": refused})
        elif _closed(conn):   # the launcher gave up waiting (the server was importing) and started cold
            refused = "the launcher is gone"
    except Exception as e:   # whatever a malformed request raises: never keep its descriptors
        refused = f"an unreadable request ({e!r})"
    if refused:
        _close(fds)   # the job's streams: held here, they would keep its pipes open
        return None
    server = os.getpid()
    try:
        sys.stdout.flush(), sys.stderr.flush()   # nothing buffered here may reach a job's log
        pid = os.fork()
    except BaseException:
        _close(fds)
        raise
    if pid == 0:   # the job's kernel, or its papermill run
        code = 1
        try:
            signal.set_wakeup_fd(-1)   # before its descriptor is closed below
            for s in inherited:
                s.close()
            conn.close()
            if request["role"] == "kernel":
                _become_kernel(request, fds, imported, server)
            else:
                _become_papermill(request, fds, server)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(_exit_cleanly(code))
    _close(fds)
    try:
        _send(conn, {"pid": pid})
    except OSError:   # the launcher died while we forked
        _kill(pid)
        return None
    return pid


def _take_over(request: dict, fds: list[int], server: int) -> None:
    """Become the job's process: a session and process group of its own (as Jupyter starts a cold kernel; the
    launcher signals the group), default signal handling, the job's standard streams, folder and environment; it
    ends with the server, however that ends (Linux's parent-death signal; the server is single-threaded)."""
    os.setsid()
    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _die_with_parent(signal.SIGKILL)
    if os.getppid() != server:   # it ended before the signal was asked for
        os._exit(1)


def _become_kernel(request: dict, fds: list[int], imported: tuple, server: int) -> None:
    _take_over(request, fds, server)
    changed, removed = imported
    os.environ.update(changed)
    for k in removed:
        os.environ.pop(k, None)
    os.environ[FORKED] = str(server)
    # ipykernel's parent poller watches the server too
    argv = [*request["argv"], f"--IPKernelApp.parent_handle={server}"]
    sys.argv = [sys.executable, "-m", "ipykernel_launcher", *argv]
    # what a new process draws without a seed differs from process to process (Python's `random` is reseeded in a
    # forked child by CPython itself; torch's CUDA generators start from a fixed seed, and are left so); the
    # server's states would be every kernel's
    import numpy as np
    import torch

    np.random.seed()
    torch.default_generator.seed()
    from ipykernel import kernelapp

    kernelapp.launch_new_instance(argv=argv)


def _become_papermill(request: dict, fds: list[int], server: int) -> None:
    """`python -m papermill ARGV`, in the job's environment as it came (papermill's imports changed nothing in it;
    the chapters' libraries' changes are their kernels' own); its kernel is another job for the server. Its
    command-line module is run again: it reads at import whether its input and output are piped, which is the
    job's standard streams, not the server's."""
    import importlib

    _take_over(request, fds, server)
    papermill = importlib.reload(sys.modules["papermill.cli"]).papermill
    sys.argv = [sys.executable, "-m", "papermill", *request["argv"]]
    papermill.main(args=request["argv"], prog_name="papermill")   # click: ends with SystemExit(papermill's status)


def _exit_cleanly(code: int) -> int:
    import atexit

    try:
        atexit._run_exitfuncs()   # what a kernel's interpreter runs at exit (IPython's history, temp files)
        sys.stdout.flush(), sys.stderr.flush()
    except BaseException:
        pass
    return code


def _die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have Linux send this process `signum` when the process that started it exits (PR_SET_PDEATHSIG); a
    SIGTERM ends the server through its `finally` (its kernels killed)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signum)   # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


# --- the workflow's side ------------------------------------------------------------------------------------

class Servers:
    """The fork servers of one workflow run, one per thread count its jobs use, each in the environment its jobs
    get (Snakemake's thread variables, and its temporary-folder variables where `tmpdir` is given); `stop` ends
    them (they also end when the process that started them does). Where they cannot start, `note` says why and
    every kernel starts cold."""

    def __init__(self, threads: list[int], tmpdir: str | None = None, run: str | None = None):
        import secrets
        import subprocess

        # random socket names: another user cannot bind them first (and both ends check each other's user)
        self.run = run or secrets.token_hex(8)
        self.procs, self.note = [], None
        if not sys.platform.startswith("linux"):
            self.note = "warm kernels need Linux; every kernel starts cold"
            return
        argv = kernel_spec("")["argv"]
        options = argv[1:argv.index("-m")]   # the kernel's interpreter options: the server runs with them
        os.environ[ENV] = self.run   # the jobs inherit it (so do the servers: it is in their environment too)
        self.threads = sorted(set(threads))
        try:
            for n in self.threads:
                env = {**os.environ, **{k: str(n) for k in THREAD_VARS},
                       **({k: tmpdir for k in TMPDIR_VARS} if tmpdir else {})}
                self.procs.append(subprocess.Popen(
                    [sys.executable, *options, "-m", "persona_em.kernels", "--serve", str(n), self.run,
                     str(os.getpid())],
                    env=env, stdin=subprocess.DEVNULL, start_new_session=True))   # a terminal's Ctrl-C is the
        except OSError as e:                                                      # workflow's to handle
            self.stop()
            self.note = f"no warm kernels ({e}); every kernel starts cold"
            return
        self._wait_bound()

    def _wait_bound(self, limit: float = 10.0) -> None:
        """Return once every server listens (each binds as soon as its Python runs, before its imports): a job
        that came first would find no server and start cold."""
        names = {address(self.run, n)[1:] for n in self.threads}
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with open("/proc/net/unix") as f:
                bound = {line.split()[-1].lstrip("@") for line in f if line.rstrip().endswith(tuple(names))}
            if names <= bound or any(p.poll() is not None for p in self.procs):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except Exception:
                p.kill()
        os.environ.pop(ENV, None)


def kernel_spec(display_name: str) -> dict:
    """ipykernel's own spec for this Python (its interpreter options, protocol, metadata), started through the
    launcher above."""
    from ipykernel.kernelspec import get_kernel_dict

    spec = get_kernel_dict()
    spec["argv"] = [("persona_em.kernels" if a == "ipykernel_launcher" else a) for a in spec["argv"]]
    return {**spec, "display_name": display_name}


def install(name: str, display_name: str, folder: str | Path | None = None, prefix: str | None = None) -> str:
    """Register the kernel spec `name` (into `folder` where a spec of that name already lies, else under
    `prefix`, default this Python's environment); returns the folder."""
    import tempfile

    from jupyter_client.kernelspec import KernelSpecManager

    spec = json.dumps(kernel_spec(display_name), indent=1)
    if folder is not None:
        (Path(folder) / "kernel.json").write_text(spec)
        return str(folder)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "kernel.json").write_text(spec)
        return KernelSpecManager().install_kernel_spec(d, name, prefix=prefix or sys.prefix)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(address(sys.argv[3], sys.argv[2]), int(sys.argv[4]))
    elif sys.argv[1:2] == ["--papermill"]:   # a workflow job: `python -m persona_em.kernels --papermill NB OUT ...`
        sys.exit(launch(sys.argv[2:], role="papermill"))
    else:
        sys.exit(launch(sys.argv[1:]))
