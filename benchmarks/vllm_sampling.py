"""vLLM's CPU build over the embedded model on given prompts, under `.venv-vllm`, the engine opened by the
project's `VLLMSampler` (same token ids in, same sampling settings); `benchmarks/sampling_backends.py` runs it and
counts the tokens. The prompts are sampled without per-request seeds (the engine's seed only): this vLLM's CPU
sampler fails with per-request generators once top-p is below 1 ("CPU Generator does not use offset"), which the
project's sampler would set.

    .venv-vllm/bin/python benchmarks/vllm_sampling.py IN.json OUT.json
IN: {"prompts": [...], "max_new_tokens": N, "temperature": T, "top_p": P}
OUT: {"replies": [{"text", "finished"}], "seconds": sampling time, "start_seconds": engine start}
"""
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from vllm import SamplingParams  # noqa: E402

from persona_em import models, sampling  # noqa: E402
from persona_em.config import HardwareConfig  # noqa: E402

job = json.loads(open(sys.argv[1]).read())
t0 = time.perf_counter()
sampler, tok = sampling.open_sampler(models.EMBEDDED, HardwareConfig(sampler="vllm"), seed=0)
start = time.perf_counter() - t0
params = SamplingParams(n=1, temperature=job["temperature"], top_p=job["top_p"], max_tokens=job["max_new_tokens"],
                        repetition_penalty=1.0)
ids = [{"prompt_token_ids": tok(p, add_special_tokens=False).input_ids} for p in job["prompts"]]
sampler.llm.generate(ids[:4], params, use_tqdm=False)   # warm-up
t0 = time.perf_counter()
outs = sampler.llm.generate(ids, params, use_tqdm=False)
secs = time.perf_counter() - t0
replies = [{"text": o.outputs[0].text.strip(), "finished": o.outputs[0].finish_reason == "stop"} for o in outs]
sampling.close(sampler)
with open(sys.argv[2], "w") as f:
    json.dump({"replies": replies, "seconds": secs, "start_seconds": start}, f)
