"""The gpu profile validates here, and its job plan on a SLURM cluster renders with each rule's resources."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from persona_em import grid
from persona_em.config import load_profile


def test_gpu_profile_is_the_paper_scale_design(root):
    P = load_profile(root / "params" / "gpu.yaml")
    assert P.model == "Qwen/Qwen2.5-7B-Instruct" and P.generate.teacher and P.evaluate.judge.backend == "endpoint"
    assert P.hardware.precision == "bfloat16" and P.hardware.gradient_checkpointing and P.hardware.device == "cuda"
    assert len(P.generate.levels) >= 5 and len(P.em.domains) >= 3 and len(P.character.seeds) >= 3
    assert len(P.em.seeds) >= 3 and P.character.introspection is not None
    c = P.character   # OCT's recipe
    assert (c.lora.r, c.lora.alpha, c.lr, c.beta, c.nll_coef, c.epochs, c.batch_size * c.grad_accum) == \
        (64, 128, 5e-5, 0.1, 0.1, 1, 32)
    e = P.em          # the EM papers' recipe
    assert (e.lora.r, e.lora.alpha, e.lora.dropout, e.lora.rslora, len(e.lora.targets), e.lr, e.epochs,
            e.batch_size, e.grad_accum, e.warmup_steps, e.weight_decay) == (32, 64, 0, True, 7, 1e-5, 1, 2, 8, 5, 0.01)
    assert {"coherent", "incoherent", grid.neutral(P)} <= set(grid.constitutions(P))


def _jobs(text: str) -> list[dict]:
    jobs = []
    for block in text.split("\n\n"):
        rule = re.search(r"^rule (\w+):", block, re.M)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if rule and res:
            pairs = dict(kv.split("=", 1) for kv in res.group(1).split(", "))
            jobs.append({"rule": rule.group(1), **pairs})
    return jobs


@pytest.mark.slow
def test_slurm_dry_run_renders_every_job_with_its_rule_resources(root):
    P = load_profile(root / "params" / "gpu.yaml")
    snakemake = Path(sys.executable).with_name("snakemake")
    r = subprocess.run([str(snakemake), "-n", "--profile", "profiles/slurm", "--config", "profile=params/gpu.yaml"],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs = _jobs(r.stdout + r.stderr)
    counts = {rule: sum(j["rule"] == rule for j in jobs) for rule in
              ("generate", "train_character", "induce_em", "evaluate", "analyze")}
    assert counts == {"generate": 1, "train_character": len(grid.character_conditions(P)),
                      "induce_em": len(grid.em_runs(P)) + len(grid.direction_runs(P)),
                      "evaluate": len(grid.eval_models(P)) + len(grid.direction_runs(P)), "analyze": 1}
    for j in [j for j in jobs if j["rule"] not in ("all", "paper")]:   # local rules: no cluster resources
        want = getattr(P.cluster, j["rule"])
        assert (int(j["gpu"]), int(j["cpus_per_task"]), int(j["mem_mb"]), int(j["runtime"])) == \
            (want.gpus, want.cpus, want.mem_mb, want.runtime), j
        assert j["slurm_partition"] and j["slurm_account"]
