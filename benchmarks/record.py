"""One format for every benchmark's figures, so that `make bench` can gather them: benchmarks/results/<name>.csv
with one row per figure: its value and unit, and the ratio that says how good it is (against the machine's
measured matmul peak, a naive baseline, or a target), with what it is against, and the machine it was measured
on (a ratio is that machine's own; a table gathered from runs on different machines says so)."""
import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["benchmark", "figure", "value", "unit", "ratio", "against", "machine"]


def this_machine() -> str:
    """'AMD EPYC (2 cores, no GPU), AVX2, no bf16 instructions': what every figure of a benchmark ran on (the
    vector width and bf16 instructions set the matmul peaks the ratios are against)."""
    import torch   # noqa: F401 (provenance names a GPU only where torch is loaded)

    from persona_em import models, provenance

    flags = models.cpu_flags()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = "bf16 instructions" if models.native_bf16() else "no bf16 instructions"
    return f"{provenance.describe_machine(provenance.machine())}, {vector}, {bf16}"


def write(name: str, rows: list[dict]) -> Path:
    """rows: dicts with figure, value, unit, ratio, against; written as results/<name>.csv (replaced whole)."""
    RESULTS.mkdir(exist_ok=True)
    dest = RESULTS / f"{name}.csv"
    tmp = dest.with_suffix(".csv.tmp")
    machine = this_machine()
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({"benchmark": name, "machine": machine,
                        **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}})
    tmp.replace(dest)
    return dest


def read(name: str) -> list[dict]:
    with open(RESULTS / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))
