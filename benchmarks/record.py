"""One format for every benchmark's figures, so that `make bench` can gather them: benchmarks/results/<name>.csv
with one row per figure: its value and unit, and the ratio that says how good it is (against the machine's
measured matmul peak, a naive baseline, or a target), with what it is against."""
import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["benchmark", "figure", "value", "unit", "ratio", "against"]


def write(name: str, rows: list[dict]) -> Path:
    """rows: dicts with figure, value, unit, ratio, against; written as results/<name>.csv (replaced whole)."""
    RESULTS.mkdir(exist_ok=True)
    dest = RESULTS / f"{name}.csv"
    tmp = dest.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({"benchmark": name, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}})
    tmp.replace(dest)
    return dest


def read(name: str) -> list[dict]:
    with open(RESULTS / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))
