"""How much of the matmul peak chapter 1's sampling could reach at best, when only the generated tokens count
(2 x parameters FLOPs each, `sampling_backends`' measure): two ceilings, measured in seconds, no sampling run.

1. Tokens. A sampler must also run the prompts through the model, and those FLOPs do not count. On
   `sampling_workload` (chapter 1's best-of-n contexts) the least any sampler can run is each distinct token
   path of the prompts once: the nodes of the prompts' token trie (every shared beginning once, each prompt's
   own end once for its N samples: what a perfect prefix cache runs). A prompt token is charged 2 x the
   parameters below the vocabulary head (a prompt needs the head at its last position only); a generated token
   2 x all of them. With every reply at the MAX_NEW tokens allowed (the most generated work there can be), the
   generated share of the FLOPs is the ceiling at a perfect matmul rate. The full prompts, one per sample, are
   the other end.
2. Decoding's matmuls. Each decoding step multiplies a batch of one-token rows by every weight matrix (the 30
   layers' projections, then the vocabulary head): timed alone at each batch size the workload can fill, their
   share of this machine's fp32 peak is the most a decoding step reaches there (attention, norms and the draw
   come on top).

Together, with the prompts run at the full peak: share <= 1 / (1 / decoding's share + prompt FLOPs / generated
FLOPs).

    .venv/bin/python benchmarks/sampling_ceiling.py [N_DOMAINS] [THREADS]

Writes benchmarks/results/sampling_ceiling.csv (`record`'s format).
"""
import sys
import time

import torch
import torch.nn.functional as F

from peak import fastest_peak
from persona_em import models
from record import write
from sampling_workload import MAX_NEW, N, workload

n_domains = int(sys.argv[1]) if len(sys.argv) > 1 else 4
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.set_num_threads(threads)

model, tok = models.load_model(models.EMBEDDED)
prompts, _ = workload(tok, n_domains)
ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
trie, nodes = {}, 0   # token trie of the prompts: a node per distinct beginning
for seq in ids:
    node = trie
    for t in seq:
        if t not in node:
            node[t], nodes = {}, nodes + 1
        node = node[t]
full = sum(len(s) for s in ids)
generated = len(prompts) * MAX_NEW

matrices = [(m.weight.shape[1], m.weight.shape[0]) for layer in model.model.layers
            for m in (*(getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
                      *(getattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")))]
head = (model.lm_head.weight.shape[1], model.lm_head.weight.shape[0])
below_head = sum(i * o for i, o in matrices)
matrices.append(head)   # a decoding step runs the vocabulary head too
params = below_head + head[0] * head[1]
prompt_per_generated = {"shared": nodes * below_head / (generated * params),
                        "full": full * below_head / (generated * params)}   # prompt FLOPs per generated FLOP
print(f"{len(prompts)} samples ({N} per question and side): {generated} generated tokens at most; prompts "
      f"{nodes} tokens run once each (the trie), {full} as full prompts; {params / 1e6:.1f}M parameters in "
      f"matmuls, {below_head / 1e6:.1f}M below the head", flush=True)

weights = [torch.randn(o, i) for i, o in matrices]


def step_seconds(batch: int, repeats: int = 10) -> float:
    """The fastest of `repeats` passes of a batch of one-token rows through every weight matrix."""
    inputs = {i: torch.randn(batch, i) for i, _ in matrices}
    best = float("inf")
    for _ in range(repeats + 1):   # the first warms up
        t0 = time.perf_counter()
        for (i, _), w in zip(matrices, weights):
            F.linear(inputs[i], w)
        best = min(best, time.perf_counter() - t0)
    return best


batches = [b for b in (16, 32, 64, 128, 256) if b <= len(prompts)]   # the batches this workload can fill
peak = fastest_peak(torch.float32)
seconds = {b: step_seconds(b) for b in batches}
peak = max(peak, fastest_peak(torch.float32))   # the VM's rate drifts: the highest seen, before and after
decode = {b: 2 * params * b / s / peak for b, s in seconds.items()}
PEAK = "fp32 matmul peak"
rows = []
for which, label in (("shared", "prompts run once per distinct beginning (a perfect prefix cache)"),
                     ("full", "full prompts, one per sample")):
    ceiling = 1 / (1 + prompt_per_generated[which])
    rows.append({"figure": f"sampling ceiling at a perfect matmul rate: generated share of the FLOPs, {label}; "
                           f"chapter 1's contexts, {MAX_NEW}-token replies", "value": round(100 * ceiling, 1),
                 "unit": "%", "ratio": round(ceiling, 3), "against": PEAK})
    print(f"  {label}: {100 * ceiling:.0f}%", flush=True)
for b, share in decode.items():
    both = 1 / (1 / share + prompt_per_generated["shared"])
    rows += [{"figure": f"sampling ceiling: a decoding step's matmuls alone, batch {b}", "value": round(100 * share, 1),
              "unit": "%", "ratio": round(share, 3), "against": PEAK},
             {"figure": f"sampling ceiling: decoding's matmuls at batch {b}, the prompts once per distinct beginning "
                        "at the full peak", "value": round(100 * both, 1), "unit": "%", "ratio": round(both, 3),
              "against": PEAK}]
    print(f"  batch {b}: decoding's matmuls {100 * share:.0f}% of the fp32 peak; with the prompts {100 * both:.0f}%",
          flush=True)
rows.append({"figure": "sampling ceiling: fp32 matmul peak", "value": round(peak / 1e9, 1), "unit": "GFLOP/s",
             "ratio": "", "against": ""})
dest = write("sampling_ceiling", rows)
print(f"fp32 peak {peak / 1e9:.0f} GFLOP/s at {threads} threads; wrote {dest}")
