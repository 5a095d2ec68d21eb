"""Committed notebooks (the chapters and the tour) are without outputs, each with exactly one `parameters` cell."""
import json

import pytest

NOTEBOOKS = ["notebooks/01_generate", "notebooks/02_train_character", "notebooks/03_induce_em",
             "notebooks/04_evaluate", "notebooks/05_analyze", "docs/tour"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_clean(root, name):
    cells = json.loads((root / f"{name}.ipynb").read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code")
    assert not any(c.get("execution_count") for c in cells if c["cell_type"] == "code")
    assert cells[0]["cell_type"] == "markdown"
    params = "".join(tagged[0]["source"])
    assert "profile_path" in params and "root" in params and "threads" in params
