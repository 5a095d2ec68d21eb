"""Teacher expansion of a constitution's questions, as Open Character Training does it.

For each trait, a few-shot prompt shows the trait and a numbered list of questions and lets the teacher
continue the list. Kept: numbered lines that end in `?` or `.`; rejected: a line sharing more than half of
its words with an earlier question. The loop runs until the target count or a cap on attempts.

Backends: the local transformers model (works offline on the embedded model) and any OpenAI-compatible
endpoint (vLLM, a hosted API). An endpoint's key is read from an environment variable named in the profile,
never stored in parameters, manifests or logs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .endpoint import EndpointClient, EndpointError, Malformed  # noqa: F401  (EndpointError re-exported)

NUMBERED = re.compile(r"^\s*(\d+)\s*[.)]\s+(.*\S)\s*$")
WORD = re.compile(r"[a-z0-9']+")


def expansion_prompt(trait: str, questions: list[str]) -> str:
    shots = "\n".join(f"{i}. {q}" for i, q in enumerate(questions, 1))
    return (f"Below is a numbered list of questions that a user might put to an AI assistant. Each one tests, "
            f"in a different real-life situation, whether the assistant has this character trait:\n"
            f"\"{trait}\"\n\n{shots}\n{len(questions) + 1}.")


def parse_numbered(continuation: str, first_number: int) -> list[str]:
    """Numbered lines of a continuation that ends in '?' or '.'; the first line continues item
    `first_number`, whose number the prompt already wrote."""
    lines = f"{first_number}. {continuation.lstrip()}".splitlines()
    out = []
    for line in lines:
        m = NUMBERED.match(line)
        if m and m.group(2).endswith(("?", ".")):
            out.append(m.group(2))
    return out


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def too_similar(candidate: str, earlier: list[set[str]], threshold: float = 0.5) -> bool:
    """True when the candidate shares more than `threshold` of its words with one earlier question."""
    w = words(candidate)
    return not w or any(len(w & e) / len(w) > threshold for e in earlier)


def expand_trait(trait: str, seeds: list[str], target: int, complete, seed: int, n_shots: int = 8,
                 batch: int = 4, max_attempts: int = 20, threshold: float = 0.5) -> tuple[list[str], dict]:
    """Additional questions for one trait (seed questions excluded), up to `target`, and loop statistics.

    `complete(prompts, seed) -> list[str]` is the backend. Few-shot examples are the seed questions plus a
    seeded sample of those accepted so far, so later prompts show the teacher more varied lists.
    """
    rng = np.random.default_rng(seed)
    accepted: list[str] = []
    seen = [words(q) for q in seeds]
    stats = {"attempts": 0, "lines": 0, "rejected_similar": 0}
    while len(accepted) < target and stats["attempts"] < max_attempts:
        prompts = []
        for _ in range(batch):
            # at most n_shots examples: the seed questions first, then accepted ones
            base = list(rng.choice(seeds, size=n_shots, replace=False)) if len(seeds) > n_shots else list(seeds)
            room = min(len(accepted), n_shots - len(base))
            shots = base + (list(rng.choice(accepted, size=room, replace=False)) if room > 0 else [])
            prompts.append((expansion_prompt(trait, shots), len(shots) + 1))
        outputs = complete([p for p, _ in prompts], seed + stats["attempts"])
        stats["attempts"] += 1
        for (_, first), text in zip(prompts, outputs):
            for q in parse_numbered(text, first):
                stats["lines"] += 1
                if too_similar(q, seen, threshold):
                    stats["rejected_similar"] += 1
                    continue
                accepted.append(q)
                seen.append(words(q))
    return accepted[:target], stats


# -- backends ---------------------------------------------------------------------------------------------
class LocalBackend:
    """Raw-text continuation with a local transformers model (no chat template: the list continues)."""

    def __init__(self, model, tok, max_new_tokens: int = 160, temperature: float = 0.9, top_p: float = 0.95):
        self.model, self.tok = model, tok
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def __call__(self, prompts: list[str], seed: int) -> list[str]:
        from .sampling import sample_text

        out = sample_text(self.model, self.tok, prompts, self.max_new_tokens, seed, len(prompts),
                          self.temperature, self.top_p, desc="expansion")
        return [o["text"] for o in out]


@dataclass
class EndpointBackend:
    """An OpenAI-compatible /v1/completions endpoint (retries and backoff: the `EndpointClient`)."""

    client: EndpointClient
    model: str
    max_new_tokens: int = 160
    temperature: float = 0.9
    top_p: float = 0.95

    def __call__(self, prompts: list[str], seed: int) -> list[str]:
        return [self.client.call(lambda c: c.completions.create(
            model=self.model, prompt=prompt, max_tokens=self.max_new_tokens, temperature=self.temperature,
            top_p=self.top_p, seed=seed * 1000 + i), _completion_text) for i, prompt in enumerate(prompts)]


def _completion_text(answer) -> str:
    text = answer.choices[0].text
    if not isinstance(text, str):
        raise Malformed("no completion text")
    return text


def make_backend(cfg, model=None, tok=None):
    """The backend a profile's `generate.expansion` section names."""
    if cfg.backend == "local":
        return LocalBackend(model, tok, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    return EndpointBackend(EndpointClient(cfg.endpoint_url, cfg.api_key_env), cfg.endpoint_model,
                           cfg.max_new_tokens, cfg.temperature, cfg.top_p)
