"""`make bench`: every performance figure of the README in one command. Runs each benchmark in turn (nothing
else should run beside it: they share the cores), each writing benchmarks/results/<name>.csv, then gathers them
into benchmarks/results/bench.csv and bench.md (the table the README points to) and prints the table. Every
figure carries its ratio: against this machine's matmul peak measured in the same benchmark, a naive baseline,
or a target.

    .venv/bin/python benchmarks/bench.py [NAME ...]     (default: all of BENCHMARKS)

With names, only those run again; the gathered table keeps the other benchmarks' last results.
"""
import csv
import subprocess
import sys
import time
from pathlib import Path

from record import COLUMNS, RESULTS, read

HERE = Path(__file__).resolve().parent
# name -> arguments: sizes that keep `make bench` at 30-45 minutes on 2 cores
BENCHMARKS = {
    "run_overhead": ["2"],               # each chapter's start twice, the faster counted
    "diversity_speed": ["10000"],        # 10,000 pool questions
    "embedding_ceiling": ["2000", "2"],  # 2,000 of them: bf16 encodes, one split by stage, 2 threads
    "training_speed": ["32", "8", "1"],  # 32 DPO pairs, batch 8, one thread as jobs run
    "sampling_backends": ["4", "2"],     # 160 samples of chapter 1's contexts (4 life domains), 2 threads
    "sampling_ceiling": ["4", "2"],      # the same contexts' token counts; decoding's matmuls alone, 2 threads
}


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; one of {sorted(BENCHMARKS)}")
    for name in names or BENCHMARKS:
        print(f"== {name} {' '.join(BENCHMARKS[name])}", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / f"{name}.py"), *BENCHMARKS[name]], check=True, cwd=HERE.parent)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s\n", flush=True)
    gather()


def gather() -> None:
    """Every benchmark's last results into bench.csv and bench.md, printed."""
    rows = [r for name in BENCHMARKS if (RESULTS / f"{name}.csv").exists() for r in read(name)]
    with open(RESULTS / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    machines: dict[str, list[str]] = {}   # machine -> the benchmarks measured on it
    for r in rows:
        names = machines.setdefault(r.get("machine") or "a machine not recorded", [])
        if r["benchmark"] not in names:
            names.append(r["benchmark"])
    table = [f"- Measured on {m}: {', '.join(names)}." for m, names in machines.items()]
    table += ["", "| figure | value | unit | ratio | against |", "| --- | ---: | --- | ---: | --- |"]
    table += [f"| {r['figure']} | {r['value']} | {r['unit']} | {r['ratio']} | {r['against']} |" for r in rows]
    (RESULTS / "bench.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"\nwrote {RESULTS / 'bench.csv'} and bench.md")


if __name__ == "__main__":
    main(sys.argv[1:])
