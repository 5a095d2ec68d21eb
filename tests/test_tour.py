"""The teaching tour (docs/tour.ipynb) through the command `make tour` runs: one persona through the five stages on
the embedded model, the executed notebook clean, the persona learned and EM induced, the book's copy current."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from persona_em import book, tour


def run_tour(root, cwd, *args):
    return subprocess.run([sys.executable, "-m", "persona_em", "tour", "--profile", str(root / "params" / "tiny.yaml"),
                           *args], cwd=cwd, capture_output=True, text=True)


def test_a_choice_the_profile_lacks_is_refused_before_any_work(root, tmp_path):
    r = run_tour(root, tmp_path, "--level", "3")   # through the command: an error line, no traceback
    assert r.returncode == 1 and r.stderr.startswith("error: tour: level = 3 is not one of profile 'tiny'"), r.stderr
    for choice, named in ((dict(constitution_name="kindness"), "constitution = 'kindness'"), (dict(draw=9), "draw = 9")):
        with pytest.raises(ValueError, match=named):
            tour.start(root / "params" / "tiny.yaml", **({"constitution_name": "candor", "level": 16, "draw": 0}
                                                        | choice), root=tmp_path)
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def toured(root, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("tour")
    r = run_tour(root, cwd, "--threads", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd / "runs" / "tiny" / "tour" / "candor-L16-s0"


@pytest.mark.e2e
def test_the_tour_runs_every_stage_and_its_notebook_shows_them(toured):
    nb = json.loads((toured / "tour.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2   # the DPO curve and the reference figure
    manifest = json.loads((toured / "manifest.json").read_text())
    assert list(manifest["seconds"]) == ["1 generate", "2 train the character", "3 induce EM", "4 evaluate"]
    assert manifest["git"]["sha"] and manifest["seeds"]["character"] == 0 and manifest["constitution"] == "candor"
    for artifact in ("pairs.jsonl", "diversity.csv", "persona/adapter_model.safetensors",
                     "em-harmful/adapter_model.safetensors", "em-benign/adapter_model.safetensors", "contrast.csv"):
        assert (toured / artifact).is_file(), artifact


@pytest.mark.e2e
def test_the_tour_learns_the_persona_and_induces_em(toured):
    """What the tour teaches holds for its own run: DPO moves the persona check up, the harmful set moves the
    in-domain contrast towards misalignment more than its benign twin, and the levels were matched."""
    summary = pd.read_csv(toured / "summary.csv").set_index("measure")["value"]
    before, after = summary.filter(like="before training").item(), summary.filter(like="after training").item()
    assert after > before + 0.02
    assert summary.filter(like="EM effect, in domain").item() > 0
    div = pd.read_csv(toured / "diversity.csv").set_index("level")
    assert div.loc[16, "vendi"] > div.loc[1, "vendi"] and (div["n_questions"] == 16).all()
    contrast = pd.read_csv(toured / "contrast.csv")
    assert set(contrast["phase"]) == {"before", "after"} and contrast["margin"].notna().all()


def test_the_books_tour_is_the_current_notebook_executed(root):
    """reference/tour/ holds the executed tour the book shows: the cells of docs/tour.ipynb as they are now
    (re-made with `python -m persona_em tour --keep reference/tour/candor-L16-s0.ipynb` when the tour changes)."""
    cells = lambda nb: [(c["cell_type"], c["source"]) for c in json.loads(nb.read_text())["cells"]
                        if "injected-parameters" not in c["metadata"].get("tags", [])]
    assert cells(root / "reference" / "tour" / f"{book.TOUR}.ipynb") == cells(root / "docs" / "tour.ipynb")
