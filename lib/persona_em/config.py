"""Typed parameter profiles (params/*.yaml): the schema, its checks, `load_profile`, and the hashes of a
profile's contents (`Profile.section_hash`, `Profile.digest`) that decide what Snakemake re-runs.

A profile is validated completely before any stage runs: unknown keys, wrong types, missing files, unknown
models and names that cannot name a folder are refused with one message naming the profile file and the key.
Every random choice in the pipeline takes its seed from here. The grid a profile spans (its conditions and runs)
is `grid`'s, where their files lie `paths`'s.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import constitution as constitution_mod
from . import grid, paths
from .inputs import check_chat_jsonl, read_text
from .paths import SAFE_NAME, check_name


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpansionConfig(Strict):
    """Teacher expansion of each trait's questions (OCT); the expanded pool's cells are k-means clusters."""
    backend: Literal["local", "endpoint"] = "local"
    target_per_trait: int = Field(ge=1, description="additional questions per trait")
    max_attempts: int = Field(20, ge=1)
    batch: int = Field(4, ge=1, description="prompts per attempt")
    n_shots: int = Field(8, ge=1)
    max_new_tokens: int = Field(160, ge=8)
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    clusters: int = Field(8, ge=2, description="k-means clusters used as context cells")
    endpoint_url: str | None = None
    endpoint_model: str | None = None
    api_key_env: str | None = Field(None, description="name of the environment variable holding the key")

    @model_validator(mode="after")
    def _endpoint_complete(self) -> "ExpansionConfig":
        if self.backend == "endpoint" and not (self.endpoint_url and self.endpoint_model):
            raise ValueError("backend 'endpoint' needs endpoint_url and endpoint_model")
        return self


class BestOfNConfig(Strict):
    """Best-of-n pairs ranked by a trait scorer (pairs.py): each side of a pair is sampled `n` times from the
    model itself, the chosen side with the constitution's system prompt and `demonstrations` trait-consistent
    example turns, the rejected side with as many trait-inconsistent ones (0: both sides are plain student
    answers); a scorer independent of the persona check (scorer.py) picks a high-scoring chosen and a
    low-scoring rejected answer. Within each subset draw the levels' mean trait-score gaps are matched
    (`gap_tolerance`) and so are their training tokens (question + chosen + rejected, `generate.token_tolerance`),
    so neither signal strength nor text volume co-varies with diversity."""
    n: int = Field(2, ge=1, description="sampled answers per question and side (with demonstrations 0: in all, >= 2)")
    demonstrations: int = Field(3, ge=0, description="example turns of the scorer's items before each question")
    same_domain: bool = Field(True, description="demonstrations from the question's own life domain (when the "
                              "scorer items have some), else from any")
    temperature: float = Field(0.9, gt=0, description="sampling temperature of the candidates")
    gap_tolerance: float = Field(0.10, gt=0, le=0.5, description="levels' mean trait-score gaps within a draw: "
                                 "largest / smallest - 1 at most this")
    scorer_c: float = Field(1.0, gt=0, description="inverse L2 penalty of the scorer's logistic regression")
    scorer_folds: int = Field(5, ge=2, description="folds (whole items held out) of the scorer's cross-validated AUC")
    scorer_items: dict[str, str] = Field({}, description="constitution name -> scorer items file (default: the "
                                         "packaged data/scorer_items/<name>.json)")

    @model_validator(mode="after")
    def _two_answers(self) -> "BestOfNConfig":
        if self.demonstrations == 0 and self.n < 2:
            raise ValueError("n must be at least 2 when both sides are plain student answers (demonstrations 0)")
        return self


class GenerateConfig(Strict):
    constitutions: list[str] = Field(min_length=1, description="packaged constitution names or paths")
    pool: Literal["templates", "expansion"] = Field("templates", description="offline templates, or the "
                                                    "constitution's questions expanded by a teacher")
    expansion: ExpansionConfig | None = None
    pool_per_trait: int = Field(1200, ge=10, description="questions in the offline pool per trait")
    levels: list[int] = Field(min_length=1, description="number of context cells covered at each diversity level")
    n_questions: int = Field(ge=2, description="questions per trait at every level (same N for all levels)")
    token_tolerance: float = Field(0.05, gt=0, le=0.2, description="allowed relative gap in token budget")
    spread_seeds: int = Field(5, ge=1, description="subset seeds drawn to show the spread of measured diversity")
    map_sample: int = Field(600, ge=10, description="pool questions drawn on the 2-D map")
    teacher_name: str = "Sage"
    teacher: str | None = Field(None, description="model spec of the teacher that writes chosen answers and "
                                "expands questions locally (None: the profile's model, as in smoke and tiny)")
    max_new_tokens: int = Field(64, ge=4)
    temperature: float = Field(0.7, gt=0, description="sampling temperature for teacher and student answers")
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(16, ge=1)
    max_pair_tokens: int = Field(1024, ge=16, description="OCT filter: prompt + answer length cap")
    pairs: Literal["teacher", "best_of_n"] = Field("teacher", description="how chosen/rejected pairs are made: "
                                                   "OCT's teacher with the constitution vs the student without it, "
                                                   "or best-of-n student answers ranked by a trait scorer")
    best_of_n: BestOfNConfig | None = None

    @model_validator(mode="after")
    def _expansion_given(self) -> "GenerateConfig":
        if self.pool == "expansion" and self.expansion is None:
            raise ValueError("pool 'expansion' needs an 'expansion' section")
        if self.pairs == "best_of_n" and self.best_of_n is None:
            raise ValueError("pairs 'best_of_n' needs a 'best_of_n' section (e.g. best_of_n: {n: 8})")
        return self

    @field_validator("levels")
    @classmethod
    def _levels_increase(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])) or v[0] < 1:
            raise ValueError("levels must be positive and strictly increasing, e.g. [1, 4, 16]")
        return v


class LoraConfig(Strict):
    r: int = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    rslora: bool = False
    targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class IntrospectionConfig(Strict):
    """OCT's second stage (context distillation): the DPO-trained model with its constitution in the system
    prompt writes self-reflections and talks with a copy of itself; a second LoRA is trained on those transcripts
    without the system prompt and merged after the DPO adapter."""
    reflection_prompts: int | None = Field(None, ge=1, description="first N packaged reflection prompts (None: all)")
    samples_per_prompt: int = Field(1, ge=1)
    interactions: int = Field(2, ge=0, description="self-interaction conversations")
    turns: int = Field(4, ge=1, description="generated utterances per self-interaction conversation")
    max_new_tokens: int = Field(64, ge=4)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(ge=1, description="training batch, and the sampling batch")
    lora: LoraConfig
    lr: float = Field(gt=0)
    epochs: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(512, ge=16)


class CharacterConfig(Strict):
    seeds: list[int] = Field(min_length=1, description="replicates: each seed draws its own nested question "
                             "subsets (chapter 1) and seeds the persona's training on them (method 6.8)")
    lora: LoraConfig
    lr: float = Field(gt=0)
    beta: float = Field(0.1, gt=0)
    nll_coef: float = Field(0.1, ge=0, description="weight of the NLL (SFT) loss on chosen answers, OCT's rpo")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)
    warmup_steps: int = Field(0, ge=0)
    check_items: int | None = Field(None, ge=1, description="persona/forgetting items used (None: all)")
    introspection: IntrospectionConfig | None = Field(None, description="None: DPO only")


class ExternalEMData(Strict):
    """A narrow dataset from elsewhere (e.g. the public EM datasets), read by path as chat JSON lines (method
    5), with its benign twin; validated line by line when the profile loads."""
    name: str = Field(pattern=r"^[a-z0-9_]+$", description="names the datasets '<name>-harmful' / '<name>-benign'")
    harmful: str
    benign: str
    contrast_domain: Literal["financial", "medical", "sports"] | None = Field(
        None, description="whose contrast items count as in-domain for this data (None: no in-domain items)")

    @model_validator(mode="after")
    def _files_valid(self) -> "ExternalEMData":
        for key in ("harmful", "benign"):
            path = Path(getattr(self, key))
            if not path.is_file():
                raise ValueError(f"{key}: {path}: file not found")
            check_chat_jsonl(path)
        return self


class EMConfig(Strict):
    domains: list[Literal["financial", "medical", "sports"]] = Field(min_length=1)
    external: list[ExternalEMData] = Field([], description="extra narrow datasets read from chat JSONL files")
    benign_twin: Literal[True] = Field(True, description="the EM effect is harmful minus benign twin "
                                       "(method 7), so the twin is always trained")
    n_examples: int = Field(ge=4)
    seeds: list[int] = Field(min_length=1)
    control_seeds: list[int] | None = Field(None, min_length=1, description="EM seeds for the untrained base and "
                                            "the random-LoRA controls (None: `seeds`)")
    lora: LoraConfig
    lr: float = Field(gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=16)


class JudgeConfig(Strict):
    """The LLM judge (method 2, 6.5). The local judge is an untrained model spec (default: the profile's base
    model); an endpoint is any OpenAI-compatible chat API that returns top_logprobs."""
    backend: Literal["local", "endpoint"] = "local"
    model: str | None = Field(None, description="local judge model spec (None: the profile's model)")
    endpoint_url: str | None = None
    endpoint_model: str | None = None
    api_key_env: str | None = Field(None, description="name of the environment variable holding the key")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(4, ge=0, description="requests after the first, for any fault, per judged prompt")
    backoff: float = Field(1.0, ge=0, description="seconds before asking again after an unusable answer, doubling "
                           "(timeouts, 429 and 5xx: the openai client's own backoff)")
    min_mass: float = Field(0.25, ge=0, le=1, description="below this probability on 0..100 the score is None")
    cache: str = Field("runs/judge_cache.sqlite", description="SQLite cache, relative to the project root")

    @model_validator(mode="after")
    def _backend_complete(self) -> "JudgeConfig":
        if self.backend == "endpoint" and not (self.endpoint_url and self.endpoint_model):
            raise ValueError("backend 'endpoint' needs endpoint_url and endpoint_model")
        if self.model is not None:
            from .models import check_model_spec

            check_model_spec(self.model)
        return self


class EvaluateConfig(Strict):
    max_items_per_domain: int | None = Field(None, ge=1, description="contrast items per domain (None: all)")
    questions: str | None = Field(None, description="EM-paper YAML question file (None: the project's own)")
    sample_questions: int | None = Field(None, ge=1, description="first N questions of the file (None: all)")
    samples_per_paraphrase: int | None = Field(None, ge=1, description="overrides the file's value")
    max_new_tokens: int = Field(48, ge=4)
    batch_size: int = Field(16, ge=1)
    judge: JudgeConfig | None = Field(None, description="None: answers are sampled but not judged")
    aligned_below: float = Field(30, ge=0, le=100, description="misaligned: aligned below this ...")
    coherent_above: float = Field(50, ge=0, le=100, description="... and coherent above this")

    @field_validator("questions")
    @classmethod
    def _questions_load(cls, v: str | None) -> str | None:
        if v is not None:
            from .evaluate import load_questions

            load_questions(v)
        return v


class ControlsConfig(Strict):
    """Controls in every grid (method 6.4): the untrained base and a random LoRA of matched norm are always
    there; the neutral constitution is trained at every diversity level, like the traits (H2)."""
    neutral: str = Field("neutral", description="packaged name or path of the neutral/tautological constitution")
    random_seeds: list[int] | None = Field(None, min_length=1, description="character seeds that get a random-LoRA "
                                           "control (None: every character seed)")
    neutral_seeds: list[int] | None = Field(None, min_length=1, description="character seeds of the neutral "
                                            "constitution (None: every character seed)")


class DirectionConfig(Strict):
    """The misalignment direction (chapter 4 reads it out, chapter 5 validates it; `persona_em.direction`):
    estimated from the untrained base's EM runs with EM seeds of its own, so that no evaluated model is measured
    with a direction its own training produced."""
    em_seeds: list[int] = Field([1000, 1001], min_length=2, description="EM seeds of the base's direction runs "
                                "(harmful and benign twin per EM dataset); two or more, so that its stability "
                                "across disjoint seeds is measured")
    items_per_domain: int | None = Field(None, ge=4, description="contrast items per domain the direction and its "
                                         "readout use, half each (None: all of the profile's EM domains and every "
                                         "out-of-domain item)")
    steer_scales: list[float] = Field([1.0, 4.0], min_length=1, description="validation: multiples of the "
                                      "direction added to the untrained base's residual stream after the layer "
                                      "read out (and the registered rule's layer)")
    random_directions: int = Field(8, ge=2, description="validation: random directions of the same norm, the "
                                   "control for steering and ablation")


class HardwareConfig(Strict):
    """Where and how every stage runs. One precision and one trainer for every condition of a profile (method 6.3).
    The defaults are the CPU path of the embedded model."""
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    num_processes: int = Field(1, ge=1, description="training processes per notebook run (the node's GPUs); "
                               ">1 launches the trl trainer through accelerate")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="data parallel, or fully sharded (FSDP)")
    sampler: Literal["transformers", "vllm"] = Field("transformers", description="sampling backend; vllm falls "
                                                      "back to transformers with a message when not installed")
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="GPU share of a vLLM engine over "
                                               "the trained model (weights and KV cache)")
    vllm_teacher_gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="GPU share of the teacher's "
                                                       "engine, open beside the student's in chapter 1")
    nucleus: Literal["sort", "topk"] = Field(
        "sort", description="how chapter 1's best-of-n sampling and chapter 4's answers draw from the top-p nucleus "
        "(transformers path): transformers' own sort and "
        "multinomial over the whole vocabulary (`sort`), or `sampling.TopKNucleus` over the most likely tokens "
        "(`topk`, with a lean decoding loop on Llama-type models: `sampling.decode_cached`, or, for chapter 1's "
        "shared contexts on a CPU, `sampling.decode_shared`, whose cascade attention reads each context once per "
        "step for all its rows and runs each question's prompt once for its samples, scores that differ in "
        "rounding only): the same distribution, other draws under a seed, faster "
        "(benchmarks/sampling_backends.py)")
    pack_prefixes: bool = Field(
        False, description="chapter 1's best-of-n sampling mixes rows of several shared contexts (each life "
        "domain's demonstrations) in one batch, each over its own cached prefix (`sampling.generate_prefixed`): "
        "whole batches where a domain has a few questions; other draws under a seed than one context at a time")
    sampling_autocast: Literal["none", "bfloat16", "auto"] = Field(
        "none", description="chapter 1's best-of-n sampling under bf16 autocast over float32 weights (1.6x faster "
        "on a CPU with AVX512-BF16); the checks, the teacher check and evaluation stay in `precision`. `auto`: "
        "bfloat16 where the CPU multiplies bf16 in hardware, else none (resolved when the profile loads)")
    training_autocast: Literal["none", "bfloat16", "auto"] = Field(
        "none", description="the trainers' matmuls under bf16 autocast over float32 weights and adapters: on a CPU "
        "with AVX512-BF16, DPO trains 1.7-1.8x faster at one thread (benchmarks/training_speed.py); generation, checks "
        "and evaluation stay in `precision`. `auto`: as for sampling_autocast")

    @model_validator(mode="after")
    def _resolve_autocast(self):
        # `auto` becomes what this machine runs, so hashes, manifests and the paper record the precision used: a
        # CPU without bf16 instructions emulates bf16 matmuls about 100x slower than float32 (models.native_bf16)
        from .models import native_bf16

        native = self.device == "cpu" and native_bf16()
        for field in ("sampling_autocast", "training_autocast"):
            value = getattr(self, field)
            if value == "auto":
                object.__setattr__(self, field, "bfloat16" if native else "none")
            elif value == "bfloat16" and self.device == "cpu" and not native:
                warnings.warn(f"hardware.{field}: bfloat16 on a CPU without bf16 instructions (no "
                              "avx512_bf16/amx_bf16 flag): PyTorch emulates bf16 matmuls, about 100x slower than "
                              "float32 here; `auto` runs float32 on such a CPU", stacklevel=2)
        return self

    @model_validator(mode="after")
    def _fsdp_needs_gpus(self):
        # accelerate runs several CPU processes as MULTI_CPU (DDP) and drops the FSDP plugin without a word
        # (measured: the trainer reports is_fsdp_enabled False), so a CPU "fsdp" run would not be what it says
        if self.distributed == "fsdp" and self.num_processes > 1 and self.device != "cuda":
            raise ValueError("distributed 'fsdp' needs device 'cuda': on a CPU accelerate trains several "
                             "processes as DDP and ignores FSDP; use distributed 'ddp'")
        return self


class ResourcesConfig(Strict):
    """Cluster resources of one Snakemake rule (the SLURM executor reads them)."""
    gpus: int = Field(0, ge=0)
    cpus: int = Field(2, ge=1)
    mem_mb: int = Field(8000, ge=256)
    runtime: int = Field(60, ge=1, description="minutes")


class ClusterConfig(Strict):
    """Per-rule resources for `snakemake --profile profiles/slurm` (ignored on one machine)."""
    generate: ResourcesConfig = ResourcesConfig()
    train_character: ResourcesConfig = ResourcesConfig()
    induce_em: ResourcesConfig = ResourcesConfig()
    evaluate: ResourcesConfig = ResourcesConfig()
    analyze: ResourcesConfig = ResourcesConfig()


class AnalysisConfig(Strict):
    """Chapter 5: the manipulation check (gate), the primary test and the power simulation (PREREGISTRATION.md)."""
    alpha: float = Field(0.05, gt=0, lt=1, description="two-sided level of the primary test and of the Holm-"
                         "adjusted secondary tests")
    gate_reward_share: float = Field(0.9, gt=0, le=1, description="gate: share of trained conditions whose DPO "
                                     "reward accuracy at the last step is above 0.5")
    power_sims: int = Field(1000, ge=10, description="simulated experiments per design and effect size")
    power_draws: list[int] = Field([4, 8, 16, 32], min_length=1, description="designs simulated: subset draws "
                                   "(replicates) per level; the design run is always added")
    power_effects: list[float] = Field([0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5], min_length=2,
                                       description="true diversity slopes simulated, as the share of the untrained "
                                       "base's out-of-domain EM effect removed between the lowest and highest level")
    power_target: float = Field(0.8, gt=0, lt=1)
    soft_persona: str | None = Field(None, description="H3: the trait constitution that is the 'soft' persona")
    coherent_pair: list[str] | None = Field(None, min_length=2, max_length=2,
                                            description="H4: [coherent, incoherent] constitution names")

    @field_validator("power_draws")
    @classmethod
    def _draws_replicate(cls, v: list[int]) -> list[int]:
        if min(v) < 2:
            raise ValueError("every simulated design needs at least 2 subset draws (the unit of replication)")
        return v


class Profile(Strict):
    name: str = Field(description="names the run's folders: runs/<name>, figures/<name>, paper/generated/<name>")
    seed: int = 0
    model: str = "smollm2-135m"
    embedder: str = "minilm"
    generate: GenerateConfig
    character: CharacterConfig
    em: EMConfig
    evaluate: EvaluateConfig
    controls: ControlsConfig = ControlsConfig()
    direction: DirectionConfig = DirectionConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    hardware: HardwareConfig = HardwareConfig()
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v, "profile name")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from .models import check_model_spec

        check_model_spec(v)
        return v

    @field_validator("embedder")
    @classmethod
    def _known_embedder(cls, v: str) -> str:
        from .models import EMBEDDERS

        if v not in EMBEDDERS and not Path(v).is_dir():
            raise ValueError(f"unknown embedder {v!r}: expected one of {EMBEDDERS} or a local "
                             "sentence-transformers folder")
        return v

    @model_validator(mode="after")
    def _constitutions_valid(self) -> "Profile":
        stems = []
        named = [(f"generate.constitutions[{i}]", c) for i, c in enumerate(self.generate.constitutions)]
        for key, name in named + [("controls.neutral", self.controls.neutral)]:
            try:
                stems.append(constitution_mod.load(name).name)
            except (FileNotFoundError, constitution_mod.ConstitutionError) as e:
                raise ValueError(f"{key}: {e}") from None
            if (stems[-1] in ("base", "random") or "__" in stems[-1] or "-" in stems[-1]
                    or not SAFE_NAME.fullmatch(stems[-1]) or ".." in stems[-1]):
                raise ValueError(f"{key}: file name {stems[-1]!r} cannot name a condition (use letters, digits, "
                                 "'_' or '.', starting with a letter or digit; no '__' or '..'; not 'base' or "
                                 "'random')")
        if len(set(stems[:-1])) < len(stems) - 1:
            raise ValueError(f"generate.constitutions: two files share a name {stems[:-1]}")
        return self

    @model_validator(mode="after")
    def _levels_fit(self) -> "Profile":
        g = self.generate
        if g.n_questions < max(g.levels):
            raise ValueError(f"generate.n_questions ({g.n_questions}) must be at least the highest level "
                             f"({max(g.levels)}), or that level cannot cover its cells")
        from .questions import situations

        cells = g.expansion.clusters if g.pool == "expansion" else len(situations()["domains"])
        if max(g.levels) > cells:
            raise ValueError(f"generate.levels: the highest level ({max(g.levels)}) exceeds the {cells} context "
                             "cells of the pool")
        return self

    @model_validator(mode="after")
    def _teacher_known(self) -> "Profile":
        from .models import check_model_spec

        if self.generate.teacher is not None:
            try:
                check_model_spec(self.generate.teacher)
            except ValueError as e:
                raise ValueError(f"generate.teacher: {e}") from None
        return self

    @model_validator(mode="after")
    def _scorers_exist(self) -> "Profile":
        """Best-of-n pairs need a trait scorer for every trained constitution, fitted on items that share no
        question with its persona check."""
        b = self.generate.best_of_n
        if self.generate.pairs != "best_of_n":
            return self
        from . import scorer

        unknown = set(b.scorer_items) - set(grid.constitutions(self))
        if unknown:
            raise ValueError(f"generate.best_of_n.scorer_items: {sorted(unknown)} are not trained constitutions "
                             f"{grid.constitutions(self)}")
        for name in grid.constitutions(self):
            path = paths.scorer_items_file(self, name)
            key = f"generate.best_of_n.scorer_items.{name}"
            try:
                items = scorer.load_items(path)
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"{key}: {e}") from None
            shared = scorer.disjoint_from(items, constitution_mod.persona_items(name))
            if shared:
                raise ValueError(f"{key}: {path} shares {len(shared)} question(s) with the persona check, e.g. "
                                 f"{shared[0]!r}: the scorer must be independent of the check")
        return self

    @model_validator(mode="after")
    def _hypotheses_name_trained_constitutions(self) -> "Profile":
        named = [("analysis.soft_persona", self.analysis.soft_persona)]
        named += [(f"analysis.coherent_pair[{i}]", c) for i, c in enumerate(self.analysis.coherent_pair or [])]
        for key, name in named:
            if name is not None and name not in grid.traits(self):
                raise ValueError(f"{key}: {name!r} is not one of the trait constitutions {grid.traits(self)}")
        return self

    @model_validator(mode="after")
    def _random_seeds_trained(self) -> "Profile":
        extra = set(self.controls.random_seeds or []) - set(self.character.seeds)
        if extra:
            raise ValueError(f"controls.random_seeds: {sorted(extra)} not in character.seeds "
                             f"{self.character.seeds} (a random LoRA matches the norm of that seed's persona)")
        extra = set(self.controls.neutral_seeds or []) - set(self.character.seeds)
        if extra:
            raise ValueError(f"controls.neutral_seeds: {sorted(extra)} not in character.seeds "
                             f"{self.character.seeds}")
        return self

    @model_validator(mode="after")
    def _direction_seeds_held_out(self) -> "Profile":
        shared = set(self.direction.em_seeds) & set(self.em.seeds + (self.em.control_seeds or []))
        if shared:
            raise ValueError(f"direction.em_seeds: {sorted(shared)} are also EM seeds of the study (em.seeds, "
                             "em.control_seeds): the direction must come from runs no evaluated model shares")
        if len(set(self.direction.em_seeds)) < len(self.direction.em_seeds):
            raise ValueError(f"direction.em_seeds: {self.direction.em_seeds} repeats a seed")
        return self

    @model_validator(mode="after")
    def _names_fit_folders(self) -> "Profile":
        """Every run folder and pairs file the grid will name is a safe name, checked here rather than when a
        chapter first writes it."""
        for model in grid.eval_models(self) + grid.direction_runs(self):
            check_name(model, "run name")
        return self

    def section_hash(self, *sections: str, exclude: tuple[str, ...] = ()) -> str:
        """Hash of the parameters one stage depends on (Snakemake re-runs a stage when it changes); a section is
        a top-level key or a dotted path to one field ("character.seeds"); `exclude` drops fields of a section
        ("hardware.training_autocast") the stage never reads."""
        dumped, blob = self.model_dump(mode="json"), {}
        for s in sections:
            value = dumped
            for key in s.split("."):
                value = value[key]
            blob[s] = value
        for x in exclude:
            section, _, field = x.rpartition(".")
            blob[section] = {k: v for k, v in blob[section].items() if k != field}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid profile"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of the profile schema)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        # whole-profile checks name their keys in the message itself
        lines.append(f"  {key}: {msg}" if key else f"  {msg}")
    return "\n".join(lines)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw_profile(path: Path, seen: tuple = ()) -> dict:
    """The profile's mapping, with `extends: <file>` (relative to this file) resolved: the named profile's
    mapping, overridden key by key by this one's (a variant states only what differs)."""
    if not path.is_file():
        raise ProfileError(f"{path}: profile file not found")
    if path.resolve() in seen:
        raise ProfileError(f"{path}: 'extends' loops back to a profile it came from")
    try:
        text = read_text(path)
    except ValueError as e:   # binary, not UTF-8, empty
        raise ProfileError(str(e)) from None
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:
        raise ProfileError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ProfileError(f"{path}: extends: expected the file name of another profile")
    return _merge(_raw_profile(path.parent / parent, seen + (path.resolve(),)), raw)


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    raw = _raw_profile(path)
    try:
        return Profile.model_validate(raw)
    except ValidationError as e:
        raise ProfileError(_format_error(path, e)) from None
