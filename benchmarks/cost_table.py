"""Cost of a profile per stage: tokens, FLOPs, GPU-hours (on an H200-class GPU unless told otherwise).

    python benchmarks/cost_table.py params/gpu.yaml [--peak 7.9e14] [--train-mfu 0.4] [--sample-mfu 0.05]
    python benchmarks/cost_table.py params/tiny.yaml --measured runs/tiny

The peak default is the bf16 matmul rate measured on the H200 lent to this project (about 790 TFLOP/s); the
utilisations are assumptions, printed with the table. With --measured, the real run's wall minutes per stage
(sum of its notebooks' durations) are printed beside the estimate.
"""
import argparse

from persona_em import cost
from persona_em.config import load_profile

ap = argparse.ArgumentParser()
ap.add_argument("profile")
ap.add_argument("--peak", type=float, default=7.9e14)
ap.add_argument("--train-mfu", type=float, default=0.4)
ap.add_argument("--sample-mfu", type=float, default=0.05)
ap.add_argument("--measured", default=None)
a = ap.parse_args()
P = load_profile(a.profile)
t = cost.estimate(P)
t["gpu_hours"] = cost.gpu_hours(t, a.peak, a.train_mfu, a.sample_mfu)
print(f"profile {P.name}: model {P.model} ({cost.n_params(P.model):.3g} parameters); peak {a.peak:.2e} FLOP/s, "
      f"training MFU {a.train_mfu}, sampling {a.sample_mfu}")
print(t.drop(columns="kind").to_string(index=False, float_format=lambda v: f"{v:.3g}"))
print(f"total: {t['flops'].sum():.3g} FLOPs, {t['gpu_hours'].sum():.1f} GPU-hours")
if a.measured:
    print("\nmeasured (sum of notebook wall minutes per stage):")
    print(cost.measured_minutes(a.measured).round(1).to_string())
