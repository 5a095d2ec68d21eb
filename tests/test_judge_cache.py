"""The judge cache under load: many evaluation jobs write and read overlapping prompts at once."""
import multiprocessing as mp
import random
import sqlite3

import numpy as np
import pytest

from persona_em.judge import JudgeCache

PROCESSES, PROMPTS, OVERLAP = 8, 120, 60


def value(prompt: str) -> np.ndarray:
    rng = np.random.default_rng(int(prompt.split("-")[1]))
    return rng.dirichlet(np.ones(101))


def worker(path: str, i: int) -> None:
    cache, rng = JudgeCache(path), random.Random(i)
    mine = [f"p-{j}" for j in range(i * OVERLAP, i * OVERLAP + PROMPTS)]   # half shared with the next worker
    rng.shuffle(mine)
    for b in range(0, len(mine), 8):
        chunk = mine[b:b + 8]
        cache.put("judge", {p: value(p) for p in chunk})
        seen = cache.get("judge", rng.sample(mine[:b + 8], min(16, b + 8)))
        for p, v in seen.items():
            if not np.allclose(v, value(p)):
                raise AssertionError(f"worker {i}: wrong value for {p}")


@pytest.mark.slow
def test_eight_processes_write_and_read_one_cache(tmp_path):
    path = str(tmp_path / "judge.sqlite")
    JudgeCache(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(path, i)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    expected = {f"p-{j}" for j in range((PROCESSES - 1) * OVERLAP + PROMPTS)}
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT prompt, COUNT(*) FROM judged GROUP BY judge, prompt").fetchall()
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert {p for p, _ in rows} == expected and all(n == 1 for _, n in rows)
    got = JudgeCache(path).get("judge", sorted(expected))
    assert len(got) == len(expected) and all(np.allclose(v, value(p)) for p, v in got.items())



def test_wal_only_on_a_local_disk(tmp_path, monkeypatch):
    """A network mount (a cluster's shared runs/ folder) keeps the rollback journal: WAL needs one host."""
    from persona_em import judge

    assert judge.on_local_disk(tmp_path)
    monkeypatch.setattr(judge, "on_local_disk", lambda path: False)
    JudgeCache(tmp_path / "shared.sqlite")
    with sqlite3.connect(tmp_path / "shared.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_mount_table_decides_local_or_network(tmp_path, monkeypatch):
    from pathlib import Path

    from persona_em import judge

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nserver:/export /work/shared nfs4 rw 0 0\n")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: real(mounts) if str(self) == "/proc/mounts"
                        else real(self, *a, **k))
    assert judge.on_local_disk(Path("/work/main"))
    assert not judge.on_local_disk(Path("/work/shared/runs"))
    assert judge.on_local_disk(Path("/work/sharedx"))
