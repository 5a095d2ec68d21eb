"""Fast unit tests: atomic writes, manifests, paper macros, the EM-effect table and the mixed model."""
import json

import numpy as np
import pandas as pd
import pytest

from persona_em import check, paper, provenance, stats
from persona_em.config import load_profile


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "adapter"
    with pytest.raises(RuntimeError):
        with provenance.atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with provenance.atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"whole")
    assert (target / "weights.bin").read_bytes() == b"whole"


def test_atomic_write_replaces_whole_file(tmp_path):
    f = provenance.atomic_write_jsonl(tmp_path / "a.jsonl", [{"x": 1}, {"x": 2}])
    assert provenance.read_jsonl(f) == [{"x": 1}, {"x": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


def test_manifest_records_provenance(tmp_path, root):
    P = load_profile(root / "params" / "test.yaml")
    run = provenance.Run("01_generate", P, tmp_path, profile_path="params/test.yaml")
    (tmp_path / "in.txt").write_text("x")
    run.record_input(tmp_path / "in.txt")
    m = json.loads(run.finish().read_text())
    for key in ("git", "parameters", "parameters_hash", "packages", "seeds", "inputs", "started", "finished"):
        assert key in m
    assert m["parameters_hash"] == P.digest() and m["packages"]["torch"].startswith("2.13.0")


def test_paper_macros(tmp_path):
    assert paper.macro_name("em_ood_candor-L16-s0") == "EmOodCandorLOneSixSZero"
    f = paper.write_numbers({"slope_in": -0.12345, "n_models": 1200, "profile": "my_run"}, tmp_path / "n.tex")
    text = f.read_text()
    assert r"\newcommand{\SlopeIn}{-0.123}" in text and r"\newcommand{\NModels}{1{,}200}" in text
    assert r"\newcommand{\Profile}{my\_run}" in text
    assert paper.fmt(-0.000412) == r"\ensuremath{-4.12\times 10^{-4}}" and paper.fmt(0.0) == "0.000"
    assert paper.fmt(9.99999e-7) == r"\ensuremath{1.00\times 10^{-6}}"   # the mantissa never rounds up to 10


def _results(effect_by_level, n_items=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    item_offsets = rng.normal(0, 0.3, n_items)
    item_sensitivity = rng.normal(0, 0.05, n_items)  # items differ in how much EM moves them
    for level, eff in effect_by_level.items():
        for harmful in (True, False):
            for i in range(n_items):
                base = -1 + item_offsets[i]
                rows.append({"condition": f"c-L{level}-s0", "constitution": "c", "level": level, "char_seed": 0,
                             "em_domain": "financial", "em_seed": 0, "item_id": f"i{i}", "split": "out_of_domain",
                             "phase": "after", "harmful": harmful,
                             "margin": base + (eff + item_sensitivity[i] if harmful else 0) + rng.normal(0, 0.01)})
    return pd.DataFrame(rows)


def test_em_effects_pairs_harmful_with_benign_twin():
    eff = stats.em_effects(_results({1: 0.2, 4: 0.1}))
    assert len(eff) == 60
    means = eff.groupby("level")["em_effect"].mean()
    assert means[1] - means[4] == pytest.approx(0.1, abs=0.01)


def test_mixed_model_recovers_a_diversity_slope():
    eff = stats.em_effects(_results({1: 0.30, 2: 0.25, 4: 0.20, 8: 0.15}))
    eff["log2_level"] = np.log2(eff["level"])
    fit = stats.fit_mixed(eff, "em_effect ~ log2_level", group="item_id")
    table = stats.effects_table(fit, "m", "em_effect ~ log2_level")
    slope = table.set_index("term").loc["log2_level"]
    assert slope["estimate"] == pytest.approx(-0.05, abs=0.005)
    assert slope["ci_low"] < -0.05 < slope["ci_high"] and slope["p"] < 1e-6


def test_check_cli_on_other_inputs(tmp_path, question_file):
    path, expected = question_file
    assert f"{expected['questions']} questions, {expected['paraphrases']} paraphrases" in check.check_file(path)
    good = tmp_path / "chat.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    assert "1 rows, 3 turns" in check.check_file(good)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(ValueError, match="line 2: no assistant turn"):
        check.check_file(bad)


def test_a_write_that_runs_out_of_space_leaves_no_file(tmp_path):
    """A full disk, simulated by a file-size limit in a child process: the artifact write fails with the system's
    error, and neither the artifact nor its temporary file remains."""
    import subprocess
    import sys

    code = ("import resource, signal, sys\n"
            "from persona_em.provenance import atomic_write_text\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n"
            f"    atomic_write_text({str(tmp_path / 'results.csv')!r}, 'x' * 100_000)\n"
            "except OSError as e:\n"
            "    print(e); sys.exit(7)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 7 and "too large" in r.stdout.lower(), r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_run_clears_what_a_killed_attempt_was_writing(root, tmp_path):
    """Temporaries of a killed attempt (an atomic write or an adapter folder cut short) go when the run starts
    again; everything else in the folder stays."""
    from persona_em.config import load_profile
    from persona_em.provenance import Run

    d = tmp_path / "run"
    (d / "pairs").mkdir(parents=True)
    (d / ".adapter.1a2b3c4d.tmp").mkdir()
    (d / ".adapter.1a2b3c4d.tmp" / "weights").write_text("half")
    (d / "pairs" / ".x.jsonl.5e6f7a8b.tmp").write_text("half")
    (d / "keep.csv").write_text("a\n")
    Run("01_generate", load_profile(root / "params" / "test.yaml"), d)
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) == ["keep.csv", "pairs"]


def test_machines_are_described_safely_for_latex_and_once_each():
    from persona_em.analysis import run_hardware
    from persona_em.provenance import describe_machine

    cpu = {"cpu": "Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz #1 & co", "cores": 16, "gpu": None}
    assert describe_machine(cpu) == "Intel Xeon Platinum 8480+ @ 2.00GHz 1  co (16 cores, no GPU)"
    gpu = cpu | {"gpu": "NVIDIA H200"}
    assert describe_machine(gpu).startswith("NVIDIA H200 (Intel Xeon")
    manifests = [{"machine": gpu}, {"machine": gpu}, {"machine": cpu}, {}]
    assert run_hardware(manifests) == "; ".join(sorted({describe_machine(gpu), describe_machine(cpu)}))
