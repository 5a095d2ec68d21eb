"""Batched, seeded sampling from a chat model (left padding, length-sorted batches)."""
from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def chat_prompt(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def sample_text(model, tok, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 16,
                temperature: float = 1.0, top_p: float = 1.0, desc: str = "sampling") -> list[dict]:
    """One sampled continuation per raw text prompt: {'text', 'finished'} in input order.

    Prompts are sorted by length so that batches carry little padding; the seed is set once, so the same
    inputs, order and seed give the same samples on a CPU.
    """
    if isinstance(model, VLLMSampler):
        return model.sample(prompts, max_new_tokens, seed, temperature, top_p)
    lengths = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[dict | None] = [None] * len(prompts)
    old_side = tok.padding_side
    tok.padding_side = "left"
    torch.manual_seed(seed)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_p=top_p, top_k=0, pad_token_id=tok.pad_token_id)
            new = gen[:, enc.input_ids.shape[1]:]
            for i, row in zip(idx, new):
                finished = bool((row == tok.eos_token_id).any())
                out[i] = {"text": tok.decode(row, skip_special_tokens=True).strip(), "finished": finished}
    finally:
        tok.padding_side = old_side
    return out


def generate(model, tok, conversations: list[list[dict]], max_new_tokens: int, seed: int, batch_size: int = 16,
             temperature: float = 1.0, top_p: float = 1.0, desc: str = "sampling") -> list[dict]:
    """One sampled assistant reply per conversation (chat template applied)."""
    return sample_text(model, tok, [chat_prompt(tok, c) for c in conversations], max_new_tokens, seed,
                       batch_size, temperature, top_p, desc)


def trim_to_sentence(text: str) -> str:
    """Cut an answer that hit the token limit back to its last complete sentence."""
    ends = list(SENTENCE_END.finditer(text))
    return text[:ends[-1].end()].strip() if ends else text.strip()


# -- vLLM (the `gpu` extra) -----------------------------------------------------------------------------------
class VLLMSampler:
    """Samples through vLLM from the same merged weights: the model is written once to a temporary folder and
    served by `vllm.LLM`; each prompt gets its own seed (seed + index), so samples do not depend on batching.
    Returns what the transformers path returns: {'text', 'finished'} per prompt, in input order."""

    def __init__(self, model, tok, hw, seed: int):
        import tempfile

        from vllm import LLM

        self._dir = tempfile.TemporaryDirectory(prefix="persona-em-vllm-")
        model.save_pretrained(self._dir.name)
        tok.save_pretrained(self._dir.name)
        self.llm = LLM(self._dir.name, dtype="bfloat16" if hw.precision == "bfloat16" else "float32", seed=seed,
                       gpu_memory_utilization=hw.vllm_gpu_memory_utilization)

    def sample(self, prompts: list[str], max_new_tokens: int, seed: int, temperature: float, top_p: float):
        from vllm import SamplingParams

        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 seed=seed + i) for i in range(len(prompts))]
        outs = self.llm.generate(prompts, params, use_tqdm=True)
        return [{"text": o.outputs[0].text.strip(), "finished": o.outputs[0].finish_reason == "stop"}
                for o in outs]


def sampler_for(model, tok, hw, seed: int = 0):
    """The sampling backend the profile asks for: the transformers model itself, or a vLLM sampler over the
    same weights. Without vLLM installed, says so and falls back to transformers (same artifact formats)."""
    if hw is None or hw.sampler == "transformers":
        return model
    import importlib.util
    import warnings

    if importlib.util.find_spec("vllm") is None:
        warnings.warn("hardware.sampler is 'vllm' but vLLM is not installed (pip install -e '.[gpu]'); "
                      "sampling with transformers instead", stacklevel=2)
        return model
    return VLLMSampler(model, tok, hw, seed)
