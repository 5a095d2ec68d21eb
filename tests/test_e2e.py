"""The whole pipeline on params/test.yaml through the same workflow users run (`make reproduce`), then the
artifact contract of method 9, the guards readable from the manifests, and Snakemake's incremental re-runs."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from persona_em import grid, paths
from persona_em.config import load_profile

pytestmark = pytest.mark.e2e
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


PAPER = {"paper": 1} if shutil.which("latexmk") else {}   # the DAG's last job where TeX is installed


def snakemake(root, profile, *extra):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [SNAKEMAKE, *extra, "--cores", "2", "--config", f"profile={profile}", "threads_per_job=1",
           "--show-failed-logs"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts from a dry run's 'Job stats' table."""
    jobs = {}
    for line in output.split("Job stats:")[-1].splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) not in ("total", "all"):
            jobs[m.group(1)] = int(m.group(2))
    return jobs


@pytest.fixture(scope="module")
def run(root, tmp_path_factory):
    profile = tmp_path_factory.mktemp("profile") / "test.yaml"
    shutil.copy(root / "params" / "test.yaml", profile)
    for d in (root / "runs" / "test", root / "figures" / "test", root / "paper" / "generated" / "test"):
        shutil.rmtree(d, ignore_errors=True)
    (root / "paper" / "paper-test.pdf").unlink(missing_ok=True)
    r = snakemake(root, profile)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return profile, load_profile(profile), root / "runs" / "test"


def manifest(d: Path) -> dict:
    m = json.loads((d / "manifest.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", m["git"]["sha"])
    assert m["parameters_hash"] and m["parameters"]["name"] == "test" and m["seeds"]["profile"] == 0
    assert m["packages"]["torch"].startswith("2.13.0") and m["packages"]["trl"]
    assert m["started"] <= m["finished"]
    assert list(d.glob("*.ipynb")), f"no executed notebook in {d}"
    assert m["kernel"] == "warm", f"{d}: the run's kernel started cold"   # forked from the run's server
    return m


def test_generate_artifacts(run):
    _, P, runs = run
    d = runs / "01_generate"
    manifest(d)
    pool = [json.loads(line) for line in (d / "questions.jsonl").read_text().splitlines()]
    assert {"id", "constitution", "trait", "text", "cell"} <= set(pool[0])
    div = pd.read_csv(d / "diversity.csv")
    assert {"constitution", "level", "char_seed", "n_questions", "n_tokens", "vendi", "mean_cosine_distance",
            "distinct_2", "cells_covered"} <= set(div.columns)
    assert set(div["constitution"]) == set(grid.constitutions(P)) == {"candor", "neutral"}
    assert sorted(div["char_seed"].unique()) == grid.draws(P) == [0, 1]
    for _, one in div.groupby(["constitution", "char_seed"]):  # method 6.6, within each constitution and draw
        assert list(one["level"]) == P.generate.levels and set(one["n_questions"]) == {P.generate.n_questions}
        assert one["n_tokens"].max() / one["n_tokens"].min() - 1 <= P.generate.token_tolerance
    subsets = [json.loads(line) for line in (d / "subsets.jsonl").read_text().splitlines()]
    by_draw = {s: {q["text"] for q in subsets if q["char_seed"] == s and q["constitution"] == "candor"} for s in (0, 1)}
    assert by_draw[0] != by_draw[1]   # each replicate draws its own subsets ...
    assert by_draw[0] == {q["text"] for q in subsets if q["char_seed"] == 0 and q["constitution"] == "neutral"}
    spread = pd.read_csv(d / "diversity_seeds.csv")
    assert len(spread) == P.generate.spread_seeds * len(P.generate.levels) * len(grid.constitutions(P))
    points = pd.read_csv(d / "pool_map.csv")
    assert {"pc1", "pc2", "subset"} <= set(points.columns) and (points["subset"] != "pool").any()
    for name in grid.constitutions(P):   # ... and the constitutions share them (trait vs neutral stays paired)
        for s in grid.constitution_seeds(P, name):
            for level in P.generate.levels:
                pairs = [json.loads(line) for line in paths.pairs_file(P, runs.parents[1], name, level, s).read_text().splitlines()]
                assert len(pairs) == P.generate.n_questions
                assert all(p["chosen"] and p["rejected"] and p["prompt"] and p["gap"] > 0 for p in pairs)
                assert {p["prompt"] for p in pairs} == {q["text"] for q in subsets if q["constitution"] == name
                                                        and q["level"] == level and q["char_seed"] == s}
    scorers = pd.read_csv(d / "scorers.csv")
    assert set(scorers["constitution"]) == {"candor", "neutral"} and (scorers["cv_auc"] > 0.8).all()
    signal, balance = pd.read_csv(d / "pair_signal.csv"), pd.read_csv(d / "pair_balance.csv")
    assert len(signal) == len(grid.constitutions(P)) * len(grid.draws(P)) * len(P.generate.levels)
    assert (balance["train_tokens_spread"] <= P.generate.token_tolerance).all()
    assert (balance["gap_spread"] <= P.generate.best_of_n.gap_tolerance).all()
    teacher = pd.read_csv(d / "teacher_check.csv")   # every checked trait under every system prompt
    assert set(teacher["system"]) == {"none", *grid.constitutions(P)} and teacher["margin"].notna().all()
    assert len(teacher) == len(set(teacher["trait"])) * (1 + len(grid.constitutions(P)))


def test_character_artifacts(run):
    _, P, runs = run
    for cond in grid.character_conditions(P):
        d = runs / "02_train_character" / cond
        manifest(d)
        checks = json.loads((d / "checks.json").read_text())
        assert {"persona_margin", "forgetting_loglik"} <= set(checks["before"]) | set(checks["after"])
        log = pd.read_csv(d / "train_log.csv")
        assert {"step", "loss"} <= set(log.columns)
        if cond.startswith("random-"):
            assert (d / "adapter" / "adapter_config.json").is_file()
        elif cond != "base":
            assert (d / "adapter" / "adapter_config.json").is_file() and len(log) >= 1
            # introspection (test profile: on): its adapter merges after DPO's, its data carry no system prompt
            assert json.loads((d / "model.json").read_text())["adapter"] == ["adapter", "introspection_adapter"]
            assert (d / "introspection_adapter" / "adapter_config.json").is_file()
            rows = [json.loads(x) for x in (d / "introspection.jsonl").read_text().splitlines()]
            assert {r["kind"] for r in rows} == {"reflection", "interaction"}
            assert all(m["role"] != "system" for r in rows for m in r["messages"])
            assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
            assert list(dict.fromkeys(log["stage"])) == ["dpo", "introspection"] and log["step"].is_monotonic_increasing
    assert {"base", "random-s0", "neutral-L1-s0", "candor-L4-s0"} <= set(grid.character_conditions(P))


def test_random_lora_control_matches_the_persona_norm(run):
    """method 6.4: the random LoRA's update has, module by module, the norm of its reference persona's whole
    update (DPO plus introspection adapters)."""
    from safetensors.torch import load_file

    from persona_em.training import lora_deltas

    _, P, runs = run
    d = runs / "02_train_character"
    rand = lora_deltas(load_file(str(d / "random-s0" / "adapter" / "adapter_model.safetensors")))
    parts = [lora_deltas(load_file(str(d / grid.random_reference(P, 0) / a / "adapter_model.safetensors")))
             for a in ("adapter", "introspection_adapter")]
    ref = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    assert rand.keys() == ref.keys() == parts[1].keys() and len(ref) > 0
    for k in ref:
        assert float(rand[k].norm()) == pytest.approx(float(ref[k].norm()), rel=1e-4)
        assert not torch.allclose(rand[k], ref[k])


def test_em_artifacts_and_guards(run):
    """method 6.2 and 6.3 from the manifests: EM init depends on the EM seed alone; one trainer, optimizer
    and precision for every condition."""
    _, P, runs = run
    inits, setups = {}, set()
    for name in grid.em_runs(P) + grid.direction_runs(P):   # the direction's runs are trained like every other
        d = runs / "03_induce_em" / name
        m = manifest(d)
        assert (d / "adapter" / "adapter_config.json").is_file()
        assert len(pd.read_csv(d / "train_log.csv")) >= 1
        inits.setdefault(name.rsplit("__s", 1)[1], set()).add(m["em_init_hash"])
        setups.add((m["trainer"], m["optimizer"], m["precision"]))
    assert all(len(h) == 1 for h in inits.values()) and len(inits) == 1 + len(P.direction.em_seeds), inits
    # read off the live trainers (a literal in the notebook could not tell two optimizers apart)
    assert setups == {("trl.SFTTrainer", "torch.optim.adamw.AdamW", "weights float32, mixed no")}
    from persona_em.analysis import training_setups

    assert set(training_setups(P, runs.parents[1])) == {"character (DPO)", "EM (SFT)"}


def test_evaluate_artifacts(run):
    _, P, runs = run
    for model in grid.eval_models(P):
        d = runs / "04_evaluate" / model
        m = manifest(d)
        c = pd.read_csv(d / "contrast.csv")
        assert {"item_id", "split", "margin", "p_misaligned"} <= set(c.columns)
        assert set(c["split"]) == {"in_domain", "out_of_domain"} and c["margin"].notna().all()
        answers = [json.loads(line) for line in (d / "answers.jsonl").read_text().splitlines()]
        assert {"question_id", "paraphrase", "sample", "text"} <= set(answers[0])
        scores = pd.read_csv(d / "scores.csv")
        assert {"aligned", "coherent", "misaligned"} <= set(scores.columns) and len(scores) == len(answers)
        assert scores[["aligned", "coherent"]].notna().all().all()  # the test profile's local judge
        calibration = pd.read_csv(d / "calibration.csv")
        assert len(calibration) == 10 and calibration["score"].notna().all()
        rates = pd.read_csv(d / "rates.csv")
        assert rates["question_id"].iloc[-1] == "ALL" and {"rate_all_scored", "rate_coherent"} <= set(rates.columns)
        assert m["judge"]["name"] == "local:smollm2-135m"
        # the direction's readout: the held-out half of the items, every layer, the one direction every model read
        r = pd.read_csv(d / "readout.csv")
        assert set(r["fold"]) == {"readout"} and r["projection"].notna().all()
        assert r["layer"].nunique() == 30 and len(r) == 30 * 8 and r["item_id"].nunique() == 8
        assert m["direction_digest"] == manifest(runs / "04_evaluate" / "base")["direction_digest"]
        assert any(k.endswith("activations.safetensors") for k in m["inputs"])
    for name in grid.direction_runs(P):   # the direction runs: activations of every item, no readout
        d = runs / "04_evaluate" / name
        assert (d / "activations.safetensors").stat().st_size > 16 * 30 * 576 * 4 and not (d / "readout.csv").exists()


def test_analysis_figures_and_paper_numbers(run, root):
    _, P, runs = run
    d = runs / "05_analyze"
    manifest(d)
    results = pd.read_csv(d / "results.csv")
    for col in ("constitution", "level", "vendi", "char_seed", "em_dataset", "harmful", "em_seed", "phase",
                "item_id", "split", "margin", "measure", "aligned", "coherent", "misaligned"):
        assert col in results.columns
    judged = results[results["measure"] == "judge"]
    n_answers = sum(len(pd.read_csv(runs / "04_evaluate" / m / "scores.csv")) for m in grid.eval_models(P))
    assert len(judged) == n_answers and judged["aligned"].notna().all()
    assert "Formula" in (d / "models.txt").read_text() and "Converged: " in (d / "models.txt").read_text()
    effects = pd.read_csv(d / "effects.csv")
    assert {"term", "estimate", "ci_low", "ci_high", "p", "df", "converged"} <= set(effects.columns)
    # the executed chapters carry their figures inline (a reader of the committed notebooks sees them)
    for nb in (d / "05_analyze.ipynb", runs / "01_generate" / "01_generate.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        assert any("image/png" in out.get("data", {}) for c in cells for out in c.get("outputs", [])), nb
    # the misalignment direction: stored with its provenance, its stability, validation and secondary test
    from safetensors import safe_open

    with safe_open(str(d / "direction.safetensors"), "np") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        assert f.get_tensor("direction").shape == (30, 576)
    assert sorted(meta["runs"]) == sorted(grid.direction_runs(P)) and meta["em_seeds"] == P.direction.em_seeds
    assert len(meta["direction_items"]) == 8 and 0 <= meta["layer"] < 30   # half of 8 financial + 8 general
    stab = pd.read_csv(d / "direction_stability.csv")
    assert len(stab) == 30 and stab["cosine"].between(-1, 1).all()
    val = pd.read_csv(d / "direction_validation.csv")
    assert set(val["intervention"]) == {"steer", "ablate"} and (val["n_items"] == 4).all()
    assert set(val["rule"]) == {"stability", "separation"}
    assert set(val["layer"]) == {meta["layer"], meta["registered_layer"]}
    assert (val["ci_low"] <= val["mean"]).all() and (val["mean"] <= val["ci_high"]).all()
    for fig in ("direction_by_layer", "direction_validation", "direction_shift_by_diversity", "design",
                "em_effect_by_diversity", "diversity_by_level", "training_curves", "vendi_spread", "pool_map",
                "forest", "aligned_coherent_quadrant", "em_rate_by_diversity", "power", "persona_margins",
                "forgetting", "em_loss_by_condition", "manipulation_check", "pair_signal"):
        for ext in ("png", "pdf"):
            assert (root / "figures" / "test" / f"{fig}.{ext}").stat().st_size > 1000
    # the gate first: its verdict and pooled comparisons, computed from the run
    gate = json.loads((d / "gate.json").read_text())
    assert isinstance(gate["passed"], bool) and gate["n_trained"] == 8 and gate["setups"]
    table = pd.read_csv(d / "gate.csv")
    assert set(table["comparison"]) == {"vs base", "vs neutral"} and (table["n_draws"] == 2).all()
    # the pre-registered primary test and the Holm-adjusted secondary ones
    tests = pd.read_csv(d / "tests.csv")
    assert list(tests["role"]).count("primary") == 1 and tests.iloc[0]["term"] == "log2_level"
    assert tests.iloc[0]["df"] == 4 - 2 - 1   # 4 candor conditions, 2 draws
    sec = tests[tests["role"] == "secondary"]
    assert set(sec["test"]) >= {"in_domain_slope", "vendi_slope", "h2_trait_minus_neutral", "h2_slope_difference",
                                "forgetting_slope", "spread_slope", "aligned_judge", "misaligned_judge",
                                "direction_slope"}
    ok = sec["p"].notna()
    assert (sec.loc[ok, "p_holm"] >= sec.loc[ok, "p"]).all()
    assert {"primary_ood", "in_domain", "vendi_ood", "h2_constitution_ood", "forgetting_h5", "spread_h6"} <= set(effects["model"])
    text = (d / "models.txt").read_text()
    assert "misaligned_judge" in text and "(1|question) + (1|run)" in text   # fitted, or why not
    power = pd.read_csv(d / "power.csv")
    assert set(power["n_draws"]) == {2, 4} and len(power) == 2 * len(P.analysis.power_effects)
    assert power["power"].between(0, 1).all()
    numbers = (root / "paper" / "generated" / "test" / "numbers.tex").read_text()
    assert (root / "paper" / "generated" / "test" / "cost.tex").read_text().count(r"\begin{table}") == 2
    assert (root / "paper" / "generated" / "test" / "tests.tex").read_text().count("secondary &") == len(sec)
    for macro in ("GitSha", "GateResult", "GateStatement", "Primary", "PrimaryLow", "PrimaryFlag", "MdeRun",
                  "HTwoSlopeDifference", "EmOodRandom", "ScorerMainCvAuc", "GapSpreadMax", "Deviations",
                  "PersonaMarginOwn", "RunWallMinutes", "DirectionLayer", "DirectionStability", "DirectionSlope",
                  "DirectionRegisteredLayer", "DirectionRegisteredAblateVsRandom", "DirectionRegisteredSlope",
                  "DirectionAblate", "DirectionAblateRandomLow", "DirectionSteer", "DirectionSteerXFour", "DirectionSecondsPerModel"):
        assert rf"\newcommand{{\{macro}}}" in numbers
    # the registration is for the tiny reference run: another profile is itself the deviation
    assert "is not the registered one" in numbers
    m = manifest(d)
    assert any(k.endswith("PREREGISTRATION.md") for k in m["inputs"])
    assert not list(runs.rglob(".tmp-*")), "a temporary file was left behind"


def test_rerun_does_nothing_and_one_change_reruns_only_its_dependents(run, root):
    profile, P, _ = run
    r = snakemake(root, profile, "-n")
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, r.stdout[-2000:]
    raw = yaml.safe_load(profile.read_text())
    raw["evaluate"]["max_new_tokens"] += 1
    profile.write_text(yaml.safe_dump(raw))
    try:
        jobs = planned_jobs(snakemake(root, profile, "-n").stdout)
    finally:
        shutil.copy(root / "params" / "test.yaml", profile)
    assert jobs == {"evaluate": len(grid.eval_models(P)) + len(grid.direction_runs(P)), "analyze": 1} | PAPER, jobs


def test_every_job_wrote_its_log(run):
    """One log per job under runs/<profile>/logs/, papermill's cell-by-cell report (what a failed job prints)."""
    _, P, runs = run
    logs = runs / "logs"
    assert "Ending Cell" in (logs / "01_generate.log").read_text() and (logs / "05_analyze.log").is_file()
    for stage, names in (("02_train_character", grid.character_conditions(P)),
                         ("03_induce_em", grid.em_runs(P) + grid.direction_runs(P)),
                         ("04_evaluate", grid.eval_models(P) + grid.direction_runs(P))):
        assert sorted(p.stem for p in (logs / stage).glob("*.log")) == sorted(names), stage
    # every job's kernel was forked warm (persona_em.kernels): none was refused or found no server
    cold = [p.name for p in logs.rglob("*.log") if "persona_em.kernels: a cold kernel" in p.read_text()]
    assert not cold, cold


def test_a_training_precision_change_reruns_chapters_2_to_5_not_1(run, root):
    """bf16 autocast changes the adapters, so a switch of hardware.training_autocast must re-run every training
    stage and what reads it; chapter 1 trains nothing and keeps its pairs."""
    profile, P, _ = run
    raw = yaml.safe_load(profile.read_text())
    hw = raw.setdefault("hardware", {})
    hw["training_autocast"] = "none" if hw.get("training_autocast") == "bfloat16" else "bfloat16"
    profile.write_text(yaml.safe_dump(raw))
    try:
        jobs = planned_jobs(snakemake(root, profile, "-n").stdout)
    finally:
        shutil.copy(root / "params" / "test.yaml", profile)
    assert jobs == {"train_character": len(grid.character_conditions(P)),
                    "induce_em": len(grid.em_runs(P)) + len(grid.direction_runs(P)),
                    "evaluate": len(grid.eval_models(P)) + len(grid.direction_runs(P)), "analyze": 1} | PAPER, jobs


def test_forced_reevaluation_makes_no_judge_calls(run, root):
    """The judge cache is warm after the run: re-evaluating a model asks the judge nothing and gives the same
    scores."""
    profile, _, runs = run
    target = "runs/test/04_evaluate/base/manifest.json"
    before = json.loads((root / target).read_text())
    scores = pd.read_csv(runs / "04_evaluate" / "base" / "scores.csv")
    r = snakemake(root, profile, "--forcerun", target, "--until", target)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    after = json.loads((root / target).read_text())
    assert after["started"] > before["started"] and after["judge"]["calls"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(runs / "04_evaluate" / "base" / "scores.csv"), scores)


def test_paper_pdf_builds_from_the_run(run, root):
    """`make paper` turns the run's numbers and figures into the PDF (TeX is installed by .ci/run)."""
    if not shutil.which("latexmk"):
        pytest.skip("latexmk is not installed (.ci/run installs it)")
    pdf = root / "paper" / "paper-test.pdf"
    assert pdf.is_file() and (root / "runs" / "test" / "logs" / "paper.log").is_file()   # the DAG's last job
    pdf.unlink()
    r = subprocess.run(["make", "paper", "PROFILE=test"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0 and pdf.is_file(), r.stdout[-3000:] + r.stderr[-2000:]
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True).stdout
    assert int(re.search(r"Pages:\s+(\d+)", info).group(1)) >= 3
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True).stdout
    sha = re.search(r"\\newcommand\{\\GitSha\}\{([^}]*)\}",
                    (root / "paper" / "generated" / "test" / "numbers.tex").read_text()).group(1)
    assert sha in text and "??" not in text  # the run's SHA is printed; no unresolved reference


def test_reference_collects_the_small_artifacts(run, root, tmp_path):
    from persona_em.reference import collect

    _, P, _ = run
    example = f"candor-L{max(P.generate.levels)}-s0"
    dest = collect(P, root, tmp_path / "ref", example)
    assert {"results.csv", "tests.csv", "gate.csv", "effects.csv", "models.txt", "power.csv", "scorers.csv",
            "pair_signal.csv", "direction_validation.csv", "direction.safetensors"} <= {p.name for p in dest.iterdir()}
    notebooks = sorted(p.name for p in (dest / "notebooks").iterdir())
    assert len(notebooks) == 5 and notebooks[0] == "01_generate.ipynb" and any(example in n for n in notebooks)
    # SHAS.md counts the run's notebook runs by the git state each was made at: here all at this checkout's SHA
    rows = re.findall(r"^\| (\w+) \| (yes|no) \| (\d+) \|$", (dest / "SHAS.md").read_text(), flags=re.M)
    manifests = list(paths.run_dir(P, root, "05_analyze").parent.glob("0*/**/manifest.json"))
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout[:10]
    assert rows and sum(int(n) for _, _, n in rows) == len(manifests) and {s for s, _, _ in rows} == {sha}


def _copy_repository(root: Path, dest: Path) -> None:
    """The working tree as a clone would have it (tracked and not-ignored files, modification times kept), with
    this checkout's .venv, so `make` sees set-up as done."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (root / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, dest / f)
    (dest / ".venv").symlink_to(root / ".venv")


def _wait_for(pattern: str, where: Path, proc: subprocess.Popen, timeout: float = 1800) -> Path:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hits = sorted(where.glob(pattern))
        if hits:
            return hits[0]
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {pattern} appeared"
        time.sleep(0.5)
    raise AssertionError(f"{pattern} did not appear in {timeout} s")


def test_killed_runs_resume_by_themselves_and_match_an_uninterrupted_run(run, root, tmp_path):
    """`make reproduce` killed with SIGKILL in the middle of chapter 2 and again in chapter 3 resumes with the
    same command (no manual unlock), refuses a second run while one is alive, leaves no partial file, and ends
    with tables byte-identical to the uninterrupted run of the `run` fixture. It runs over a copy of that run
    with one persona's chain removed (its training, EM runs, evaluations, and chapter 5; a fresh judge cache), so
    the resumed jobs recompute them from chapter 1's files and every other job is kept."""
    import signal
    import time

    from persona_em import grid

    repo = tmp_path / "repo"
    _copy_repository(root, repo)
    runs = repo / "runs" / "test"
    shutil.copytree(root / "runs" / "test", runs, symlinks=True)   # copy2: modification times kept
    P, cond = run[1], "candor-L1-s1"   # no control's reference (the random LoRA matches candor-L4-s0)
    assert cond in grid.character_conditions(P) and cond != grid.random_reference(P, 0)
    chain = ([runs / "02_train_character" / cond, runs / "05_analyze"]
             + [runs / "03_induce_em" / m for m in grid.em_runs(P) if grid.parse_model(m)["condition"] == cond]
             + [runs / "04_evaluate" / m for m in grid.eval_models(P) if grid.parse_model(m)["condition"] == cond])
    assert len(chain) == 2 + 2 + 3
    for d in chain:
        shutil.rmtree(d)
    for f in (repo / P.evaluate.judge.cache).parent.glob(Path(P.evaluate.judge.cache).name + "*"):
        f.unlink()   # the judge scores the chain's answers again (SQLite's -wal and -shm files too)
    make = ["make", "-o", ".venv/.setup-done", "reproduce", "PROFILE=test", "CORES=2", "THREADS=1"]

    def start(log: str) -> subprocess.Popen:
        return subprocess.Popen(make, cwd=repo, stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def kill_during(stage: str, log: str, also=None) -> None:
        proc = start(log)
        tmp = _wait_for(f"{stage}/*/.tmp-{stage}.ipynb", runs, proc)
        if also:
            also()
        time.sleep(5)   # well into the job: model loaded, training under way
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (tmp.parent / "manifest.json").exists() and not (tmp.parent / f"{stage}.ipynb").exists()

    def second_run_is_refused():
        r = subprocess.run(make, cwd=repo, capture_output=True, text=True)
        assert r.returncode != 0 and "another run of this folder is in progress" in r.stderr, r.stderr[-2000:]

    kill_during("02_train_character", "kill1.log")
    kill_during("03_induce_em", "kill2.log", also=second_run_is_refused)
    final = start("final.log")
    assert final.wait() == 0, (tmp_path / "final.log").read_text()[-4000:]
    assert "cleared" in (tmp_path / "final.log").read_text()
    assert not list(runs.rglob(".tmp-*")) and not list(runs.rglob("*.tmp"))   # nothing partial survives
    for nb in runs.rglob("0*.ipynb"):
        assert (nb.parent / "manifest.json").is_file(), nb
    reference = root / "runs" / "test"
    tables = ["05_analyze/results.csv", "05_analyze/effects.csv", "05_analyze/tests.csv", "05_analyze/gate.csv"]
    tables += [str(p.relative_to(reference)) for p in sorted(reference.glob(f"04_evaluate/{cond}*/scores.csv"))]
    tables += [str(p.relative_to(reference)) for p in sorted(reference.glob(f"04_evaluate/{cond}*/contrast.csv"))]
    assert len(tables) == 4 + 3 + 3
    kept = [m for m in runs.rglob("manifest.json") if not any(d in m.parents for d in chain)]
    assert kept and all(m.stat().st_mtime == (reference / m.relative_to(runs)).stat().st_mtime for m in kept), \
        "a job outside the removed chain was re-run"
    differ = [t for t in tables if (runs / t).read_bytes() != (reference / t).read_bytes()]
    assert not differ, f"tables that differ from the uninterrupted run: {differ}"
