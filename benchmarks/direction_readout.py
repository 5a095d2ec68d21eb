"""The misalignment direction on a finished run's models, without re-running its chapters.

    python benchmarks/direction_readout.py --profile params/tiny.yaml --root <project root of the run> --out <dir>

Trains the untrained base's direction runs (the profile's `direction.em_seeds`, exactly as chapter 3 would),
records their activations, reads out every evaluated model of the run (its adapters from `<root>/runs/`), then
does what chapter 5's section 5.6 does: stability, the layer, steering and ablation, and the EM shift along the
direction by diversity with the primary model's structure. Everything goes to `--out` (the run's folders are
only read): the tables, the figures and `summary.json` with the seconds each step took. Use it to measure the
readout on a run made before the readout existed; a run of the current pipeline has all of it in chapters 4-5.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from persona_em import analysis, config, direction, em, grid, models, paths, plots, provenance, stats, training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--root", required=True, help="the project root the run's runs/<profile>/ folder is in")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    P, root, out = config.load_profile(a.profile), Path(a.root), Path(a.out)
    if not (paths.run_dir(P, root, paths.ANALYZE) / paths.MANIFEST).is_file():
        raise SystemExit(f"{root}/runs/{P.name}: not a finished run of profile {P.name!r}")
    out.mkdir(parents=True, exist_ok=True)
    models.set_threads(a.threads)
    timing: dict[str, float] = {}
    items = direction.items(P)
    fold_of = direction.folds(items, P.seed)
    held_out = [it for it in items if fold_of[it["id"]] == "readout"]

    # the direction runs: chapter 3's EM training of the untrained base with the direction's seeds
    runs = {}
    for name in grid.direction_runs(P):
        info = grid.parse_model(name)
        domain, kind = info["em_dataset"].rsplit("-", 1)
        rows, _ = em.dataset_rows(P, domain, kind)
        start = time.perf_counter()
        model, tok = models.load_model(P.model, hw=P.hardware)
        adapter = out / "direction_runs" / name / "adapter"
        training.fit("sft", model, tok, rows, P.em, info["em_seed"], P.hardware, adapter, spec=P.model)
        model, tok = models.load_model(P.model, [adapter], hw=P.hardware)
        runs[name] = (direction.answer_activations(model, tok, items, P.evaluate.batch_size), [it["id"] for it in items])
        timing[f"direction run {name}"] = time.perf_counter() - start
        print(f"{name}: {timing[f'direction run {name}']:.1f} s", flush=True)
    vector = direction.estimate(P, runs)
    stability = direction.stability(P, runs)
    separation = direction.separation(P, runs)
    layer = analysis.direction_layer(stability)
    layers = {"stability": layer, "separation": analysis.separation_layer(separation)}

    # the readout of every evaluated model of the run
    div = pd.read_csv(paths.run_dir(P, root, paths.GENERATE) / paths.DIVERSITY)
    tables, seconds = {}, []
    for k, m in enumerate(grid.eval_models(P)):
        model, tok = models.load_model(P.model, paths.adapters(P, root, m), hw=P.hardware)
        start = time.perf_counter()
        tables[m] = direction.readout(direction.answer_activations(model, tok, held_out, P.evaluate.batch_size),
                                      held_out, vector, fold_of)
        seconds.append(time.perf_counter() - start)
        if k % 10 == 0:
            print(f"readout {k + 1}/{len(grid.eval_models(P))}: {seconds[-1]:.1f} s", flush=True)
    readout = analysis.readout_frame(P, tables, div)

    # validation: steering the untrained base, ablating from the base after harmful EM
    start = time.perf_counter()
    ood = [it for it in held_out if it["split"] == "out_of_domain"]
    base, tok = models.load_model(P.model, hw=P.hardware)
    harmful = (models.load_model(P.model, paths.adapters(P, root, r), hw=P.hardware)[0]
               for r in direction.ablated_runs(P))
    validation = direction.validation_summary(direction.validate(
        base, harmful, tok, ood, vector, layers, P.direction.steer_scales, P.direction.random_directions,
        P.seed, P.evaluate.batch_size))
    timing["validation"] = time.perf_counter() - start

    # the EM shift along the direction, analysed as the primary outcome is
    effects = analysis.em_effect_table(readout[readout["layer"] == layer], measure="direction", outcome="projection")
    summary = analysis.level_summary(effects)
    fit, formula, df = stats.primary_model(effects, grid.traits(P))
    slope = stats.effects_table(fit, "direction_ood", formula, df)
    numbers = analysis.direction_numbers(layer, stability, separation, validation, summary, float(np.mean(seconds)))

    for name, frame in [("stability", stability), ("separation", separation), ("validation", validation),
                        ("shift_summary", summary), ("slope", slope), ("readout", readout)]:
        provenance.atomic_write_csv(out / f"{name}.csv", frame)
    plots.set_style()
    plots.save(plots.direction_overview(stability, separation, analysis.direction_by_layer(readout), layers), out,
               "direction_by_layer")
    plots.save(plots.direction_validation(validation), out, "direction_validation")
    plots.save(plots.em_effect_by_diversity(summary, "EM shift along the direction\n(harmful - benign twin)",
                                            "The misalignment direction vs question diversity"), out,
               "direction_shift_by_diversity")
    provenance.atomic_write_json(out / "summary.json", {
        "profile": P.name, "root": str(root), "git": provenance.git_state(), "layer": layer, "numbers": numbers,
        "slope": slope.set_index("term").loc["log2_level"].to_dict(), "formula": formula,
        "converged": bool(fit.converged_ok), "seconds": timing | {"readout per model (mean)": float(np.mean(seconds))}})
    print(json.dumps(numbers, indent=1))
    print(slope.to_string())


if __name__ == "__main__":
    main()
