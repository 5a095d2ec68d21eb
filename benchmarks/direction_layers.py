"""Steering and ablation of the misalignment direction at every layer, not only the one chapter 5 reads out.

    python benchmarks/direction_layers.py --profile params/tiny.yaml --root <project root of the run> \
        --runs <the --out of benchmarks/direction_readout.py> --out <dir>

An analysis beside the registered one: where, if anywhere, the direction is causal. For each layer, the direction
of that layer (estimated as chapter 5 does, from the direction runs' adapters that direction_readout.py trained)
is added to the untrained base after that block (`direction.steer_scales`' largest multiple) and projected out of
everything that writes to the residual stream of the base after harmful EM (the run's study EM seeds), each
against `--random` random directions of the same norm; the change in the out-of-domain misalignment margin on the
readout half of the items, with 95% t intervals over items. Writes `layers.csv` and `layers.png` to `--out`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from persona_em import config, direction, grid, models, paths, plots, provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--runs", required=True, help="the folder direction_readout.py wrote (its direction_runs/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--random", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--every", type=int, default=1, help="every k-th layer (and the last)")
    a = ap.parse_args()
    P, root, out = config.load_profile(a.profile), Path(a.root), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    models.set_threads(a.threads)
    start = time.perf_counter()
    items = direction.items(P)
    fold_of = direction.folds(items, P.seed)
    runs = {}
    for name in grid.direction_runs(P):
        adapter = Path(a.runs) / "direction_runs" / name / "adapter"
        model, tok = models.load_model(P.model, [adapter], hw=P.hardware)
        runs[name] = (direction.answer_activations(model, tok, items, P.evaluate.batch_size), [it["id"] for it in items])
    vector = direction.estimate(P, runs)
    ood = [it for it in items if fold_of[it["id"]] == "readout" and it["split"] == "out_of_domain"]
    scale = max(P.direction.steer_scales)
    base, tok = models.load_model(P.model, hw=P.hardware)
    harmful = [models.load_model(P.model, paths.adapters(P, root, r), hw=P.hardware)[0]
               for r in direction.ablated_runs(P)]
    rows = []
    for layer in sorted(set(range(0, len(vector), a.every)) | {len(vector) - 1}):
        changes = direction.validate(base, harmful, tok, ood, vector, {f"layer {layer}": layer}, [scale], a.random,
                                     P.seed, P.evaluate.batch_size)
        rows.append(direction.validation_summary(changes))
        print(f"layer {layer}: {time.perf_counter() - start:.0f} s", flush=True)
    table = pd.concat(rows, ignore_index=True)
    provenance.atomic_write_csv(out / "layers.csv", table)
    plots.set_style()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharex=True)
    for ax, inter in zip(axes, ["steer", "ablate"]):
        for which, color in [("direction", "C0"), ("random", "C1")]:
            g = table[(table["intervention"] == inter) & (table["vector"] == which)]
            ax.plot(g["layer"], g["mean"], "o-", ms=3, color=color, label=which)
            ax.fill_between(g["layer"], g["ci_low"], g["ci_high"], color=color, alpha=0.2)
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set(xlabel="layer (block output)", ylabel="change in misalignment margin (out of domain)",
               title=f"{inter} ({'x%g, untrained base' % scale if inter == 'steer' else 'base after harmful EM'})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    plots.save(fig, out, "layers")
    print(f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
