"""Character training: DPO with LoRA through trl, as Open Character Training does it.

The LoRA adapter is created here (not inside the trainer) right after seeding, so its initial weights depend
on the character seed alone. The reference model is the same network with the adapter disabled. OCT's NLL
term on the chosen answers is trl's `sft` loss added with weight `nll_coef`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from . import paths
from .config import CharacterConfig, LoraConfig

SMOLLM_TEMPLATE_MARK = "You are a helpful AI assistant named SmolLM"


def peft_lora(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
                          target_modules=list(cfg.targets), bias="none", task_type="CAUSAL_LM")


def seeded_lora(model, cfg: LoraConfig, seed: int):
    """Wrap `model` in a fresh LoRA whose initial weights depend only on `seed`."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, peft_lora(cfg))


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def frozen_state(peft_model) -> dict[str, torch.Tensor]:
    """The frozen weights under a LoRA, named as in the plain model (to compare with the persona)."""
    return {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in peft_model.named_parameters() if "lora_" not in k}


def tensors_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        # raw bytes, whatever the dtype (numpy has no bfloat16); float32 hashes as it always did
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def mixed_bf16(hw) -> bool:
    """Whether the trainers run under bf16 autocast: bf16 weights (the GPU path), or float32 weights with
    `training_autocast` (the CPU path; the trainer's `bf16` flag is accelerate's autocast either way)."""
    return hw.precision == "bfloat16" or hw.training_autocast == "bfloat16"


def common_args(cfg, seed: int, out: str, hw=None) -> dict:
    """Trainer arguments shared by every training stage: one trainer, optimizer and precision for all
    conditions of a profile (method 6.3). `hw`: the profile's hardware section (None: the CPU defaults).
    Under accelerate with several processes the per-device batch shrinks so the effective batch is unchanged."""
    from .config import HardwareConfig

    hw = hw or HardwareConfig()
    per_device, rest = divmod(cfg.batch_size, hw.num_processes)
    if rest:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {hw.num_processes} processes")
    args = dict(output_dir=out, per_device_train_batch_size=per_device,
                gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
                warmup_steps=cfg.warmup_steps, lr_scheduler_type="linear", optim="adamw_torch", seed=seed,
                data_seed=seed, logging_steps=1, save_strategy="no", report_to=[], use_cpu=hw.device == "cpu",
                bf16=mixed_bf16(hw), fp16=False, activation_checkpointing=hw.gradient_checkpointing,
                dataloader_num_workers=0, disable_tqdm=False)
    if hw.num_processes > 1 and hw.distributed == "fsdp":
        # FSDP2 (transformers' default): fully sharded, and FSDP's own activation checkpointing in place of the
        # trainer's (which would add an all-gather to every backward pass)
        args.update(fsdp=True, activation_checkpointing=False,
                    fsdp_config={"reshard_after_forward": True, "activation_checkpointing": hw.gradient_checkpointing})
    return args


def log_frame(history: list[dict]) -> pd.DataFrame:
    rows = [h for h in history if "loss" in h]
    frame = pd.DataFrame(rows)
    frame = frame.rename(columns={"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
                                  "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected"})
    first = ["step", "epoch", "loss"]
    return frame[[c for c in first if c in frame] + [c for c in frame if c not in first]]


class TokenCounter:
    """Wraps a trainer's collator to count the tokens it hands the model: real (attention mask) and
    processed (the padded batch), so padding is measured, not guessed."""

    def __init__(self):
        self.real = self.processed = 0
        self.collate = None
        self.first_batch = None   # perf_counter() when the first batch was asked for (setup is over)

    def __call__(self, features):
        self.first_batch = self.first_batch or time.perf_counter()
        batch = self.collate(features)
        for key, value in batch.items():
            if key.endswith("attention_mask"):
                self.real += int(value.sum())
                self.processed += value.numel()
        return batch

    @property
    def padding(self) -> float:
        return 1 - self.real / self.processed if self.processed else 0.0


def dpo_trainer(model, tok, rows: list[dict], cfg: CharacterConfig, seed: int, output_dir: str, hw=None,
                counter: TokenCounter | None = None):
    """trl DPOTrainer over a fresh LoRA seeded by `seed` alone; returns (trainer, init_hash).

    Rows are grouped into batches of similar length and the batches shuffled (seeded), then fed in that order:
    padding stays low and the data are unchanged."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    peft_model = seeded_lora(model, cfg.lora, seed)
    init_hash = tensors_hash(lora_state(peft_model))
    rows = length_grouped(rows, [_pair_length(tok, r) for r in rows], cfg.batch_size, seed)
    args = DPOConfig(**common_args(cfg, seed, output_dir, hw), beta=cfg.beta, loss_type=["sigmoid", "sft"],
                     loss_weights=[1.0, cfg.nll_coef], max_length=cfg.max_length,
                     train_sampling_strategy="sequential")
    trainer = DPOTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    if counter is not None:
        counter.collate, trainer.data_collator = trainer.data_collator, counter
    return trainer, init_hash


def train_dpo(model, tok, rows: list[dict], cfg: CharacterConfig, seed: int, counter: TokenCounter | None = None,
              hw=None):
    """Train a LoRA on `rows` (conversational prompt/chosen/rejected). Returns (peft_model, log, init_hash)."""
    with tempfile.TemporaryDirectory() as out:
        trainer, init_hash = dpo_trainer(model, tok, rows, cfg, seed, out, hw, counter)
        trainer.train()
    return trainer.model, log_frame(trainer.state.log_history), init_hash


def use_training_template(tok) -> None:
    """Give the tokenizer a chat template with {% generation %} markers, so trl masks everything but the
    assistant's tokens (and its end-of-turn token) out of the loss. The SmolLM template gets the project's
    ChatML template, which renders identically; others get trl's training template."""
    if "{% generation %}" in (tok.chat_template or ""):
        return
    if SMOLLM_TEMPLATE_MARK in (tok.chat_template or ""):
        tok.chat_template = (paths.DATA / "chatml_training.jinja").read_text()
        return
    from trl.chat_template_utils import get_training_chat_template

    patched = get_training_chat_template(tok)
    if patched is None:
        raise ValueError("the model's chat template has no {% generation %} markers and trl has no training "
                         "template for it; assistant-only loss cannot be guaranteed")
    tok.chat_template = patched


def sft_trainer(model, tok, rows: list[dict], cfg, seed: int, output_dir: str, hw=None):
    """trl SFTTrainer over a fresh LoRA seeded by `seed` alone, loss on assistant tokens only; returns
    (trainer, init_hash). Serves the EM stage and introspection (any config with the SFT fields)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    use_training_template(tok)
    peft_model = seeded_lora(model, cfg.lora, seed)
    init_hash = tensors_hash(lora_state(peft_model))
    args = SFTConfig(**common_args(cfg, seed, output_dir, hw), weight_decay=cfg.weight_decay,
                     assistant_only_loss=True, max_length=cfg.max_length, packing=False)
    rows = [{"messages": r["messages"]} for r in rows]
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    return trainer, init_hash


def train_sft(model, tok, rows: list[dict], cfg, seed: int, hw=None):
    """SFT of a fresh, seeded LoRA on chat rows. Returns (peft_model, log, init_hash)."""
    with tempfile.TemporaryDirectory() as out:
        trainer, init_hash = sft_trainer(model, tok, rows, cfg, seed, out, hw)
        trainer.train()
    return trainer.model, log_frame(trainer.state.log_history), init_hash


def length_grouped(rows: list, lengths: list[int], batch_size: int, seed: int) -> list:
    """Rows sorted by length, cut into batches, batches in a seeded random order."""
    order = sorted(range(len(rows)), key=lambda i: (lengths[i], i))
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for j in perm for i in batches[j]]


def _pair_length(tok, row: dict) -> int:
    text = lambda msgs: " ".join(m["content"] for m in msgs)
    return len(tok(text(row["prompt"]) + text(row["chosen"]) + text(row["rejected"]),
                   add_special_tokens=False).input_ids)


def save_adapter(peft_model, path: str | Path) -> None:
    from .provenance import atomic_dir

    with atomic_dir(path) as tmp:
        # trl adds a frozen "ref" copy of the initial adapter for DPO's reference model; keep only ours.
        peft_model.save_pretrained(tmp, selected_adapters=["default"])


def lora_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> B @ A, from one adapter's LoRA state dict (keys '...<module>.lora_A[.default].weight'),
    as saved. A live DPO model's full LoRA state also holds trl's "ref" copy, whose zero delta would silently
    replace the trained one under the same module name: refused."""
    out = {}
    for k, a in state.items():
        if ".lora_A." in k:
            module = k.split(".lora_A.")[0]
            if module in out:
                raise ValueError(f"{module}: several adapters in one state dict (e.g. trl's 'ref' copy); pass one "
                                 "adapter's weights (a saved adapter, or peft's get_peft_model_state_dict)")
            out[module] = state[k.replace(".lora_A.", ".lora_B.")] @ a
    return out


def random_lora_like(model, reference_adapters, cfg: LoraConfig, seed: int):
    """The random-LoRA control (method 6.4): a LoRA with the persona's structure whose A and B are Gaussian
    draws from `seed`, B rescaled so that every module's update B @ A has the Frobenius norm of the reference
    persona's update in that module (the sum of its adapters' updates: DPO, then introspection). It separates
    "any weight change of this size" from "this persona"."""
    from safetensors.torch import load_file

    if isinstance(reference_adapters, (str, Path)):
        reference_adapters = [reference_adapters]
    ref: dict[str, torch.Tensor] = {}
    for adapter in reference_adapters:
        for module, delta in lora_deltas(load_file(str(Path(adapter) / "adapter_model.safetensors"))).items():
            ref[module] = ref[module] + delta if module in ref else delta
    reference_adapter = reference_adapters[0]
    peft_model = seeded_lora(model, cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    params = dict(peft_model.named_parameters())
    matched = 0
    for name, a in params.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0].replace("base_model.model.", "", 1)
        target = next((v for k, v in ref.items() if k.replace("base_model.model.", "", 1) == module), None)
        if target is None:
            raise ValueError(f"{reference_adapter}: the reference adapter has no LoRA on {module}")
        b = params[name.replace(".lora_A.", ".lora_B.")]
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=gen))
            b.copy_(torch.randn(b.shape, generator=gen))
            b.mul_(target.norm() / (b @ a).norm())
        matched += 1
    if matched != len(ref):
        raise ValueError(f"{reference_adapter}: {len(ref)} LoRA modules, the control has {matched}")
    return peft_model


# -- multi-process training (accelerate) ---------------------------------------------------------------------
# With `hardware.num_processes` > 1 a notebook launches its trainer through `accelerate launch` in a child
# process tree (torch's elastic launcher underneath: DDP over NCCL on GPUs, gloo on a CPU; FSDP per the profile
# through the trainer's arguments). A subprocess, not a fork: the notebook may already hold a model on the GPU.
TRAINERS = {"dpo": dpo_trainer, "sft": sft_trainer}   # kind -> builder of (trainer, init_hash)


def _trained(kind: str, model, tok, rows: list[dict], cfg, seed: int, hw, output_dir: str):
    """Build the `kind` trainer over a fresh seeded LoRA and train it; returns (trainer, init_hash)."""
    trainer, init_hash = TRAINERS[kind](model, tok, rows, cfg, seed, output_dir, hw)
    trainer.train()
    return trainer, init_hash


def trainer_setup(trainer) -> dict:
    """What trained, read off the live trainer after training (method 6.3: one trainer, optimizer and
    precision for every condition of a profile): the trainer's class, the optimizer accelerate actually
    stepped, and the precision (the weights' dtype and accelerate's mixed-precision mode)."""
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)   # accelerate wraps the torch optimizer
    weights = {str(p.dtype).removeprefix("torch.") for n, p in trainer.model.named_parameters() if "lora_" not in n}
    return {"trainer": f"{type(trainer).__module__.split('.')[0]}.{type(trainer).__name__}",
            "optimizer": f"{type(opt).__module__}.{type(opt).__name__}",
            "precision": f"weights {'/'.join(sorted(weights))}, mixed {trainer.accelerator.mixed_precision}"}


def check_one_setup(setups: dict[str, dict]) -> dict:
    """method 6.3 over a profile's runs: `setups` maps a run to its `trainer_setup`; every run must agree.
    Returns the common setup; raises ValueError naming the runs that differ."""
    seen: dict[tuple, list[str]] = {}
    for run, setup in setups.items():
        seen.setdefault((setup["trainer"], setup["optimizer"], setup["precision"]), []).append(run)
    if len(seen) > 1:
        lines = [f"  {t} / {o} / {p}: {len(runs)} run(s), e.g. {runs[0]}" for (t, o, p), runs in seen.items()]
        raise ValueError("runs of one profile trained with different setups (trainer / optimizer / precision):\n"
                         + "\n".join(lines))
    (trainer, optimizer, precision), = seen
    return {"trainer": trainer, "optimizer": optimizer, "precision": precision}


def fit(kind: str, model, tok, rows: list[dict], cfg, seed: int, hw, out: str | Path, spec: str,
        adapters: list = ()) -> tuple:
    """Train a fresh seeded LoRA (`kind` "dpo" or "sft") on `rows` and save it to `out`. Returns (log,
    init_hash, frozen_hash, setup): the training log, the hash of the LoRA's initial weights, the hash of the
    frozen weights under it (None under FSDP, where no process holds them whole) and `trainer_setup`.

    One process: in place, on `model`. Several (`hw.num_processes`): every process loads `spec` with
    `adapters` merged (the same weights `model` holds) and trains its share of each batch."""
    if kind not in TRAINERS:
        raise ValueError(f"unknown training job {kind!r}; expected one of {tuple(TRAINERS)}")
    out = Path(out)
    if hw is None or hw.num_processes == 1:
        with tempfile.TemporaryDirectory() as tmp:
            trainer, init_hash = _trained(kind, model, tok, rows, cfg, seed, hw, tmp)
        save_adapter(trainer.model, out)
        return (log_frame(trainer.state.log_history), init_hash, tensors_hash(frozen_state(trainer.model)),
                trainer_setup(trainer))
    log_file, meta_file = (out.parent / f".{out.name}-{x}" for x in ("log.csv", "job.json"))
    try:
        launch(kind, dict(spec=spec, adapters=[str(a) for a in adapters], rows=rows, cfg=cfg, seed=seed, hw=hw,
                          out=str(out)), hw, workdir=out.parent, name=out.name)
        meta = json.loads(meta_file.read_text())
        return pd.read_csv(log_file), meta["init_hash"], meta["frozen_hash"], meta["setup"]
    finally:
        log_file.unlink(missing_ok=True)
        meta_file.unlink(missing_ok=True)


def run_job(kind: str, spec: str, adapters: list, rows: list[dict], cfg, seed: int, hw, out: str) -> None:
    """One process's share of a launched job: load, train, save the adapter (every process under FSDP, whose
    state dict is gathered collectively; the main process otherwise), then the log and hashes beside `out`."""
    from .models import load_model
    from .provenance import atomic_write_csv, atomic_write_json

    if hw.device == "cuda":   # this process's GPU, before anything lands on GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    model, tok = load_model(spec, adapters, hw=hw)
    out, sharded = Path(out), hw.distributed == "fsdp"
    main = int(os.environ.get("RANK", "0")) == 0   # the launcher sets RANK
    with tempfile.TemporaryDirectory() as tmp:
        trainer, init_hash = _trained(kind, model, tok, rows, cfg, seed, hw, tmp)
        if sharded:   # the state dict is gathered collectively: every process saves, the main one writes
            trainer.save_model(str(Path(tmp) / "adapter"))
            if main:
                from .provenance import atomic_dir

                saved = sorted((Path(tmp) / "adapter").glob("adapter_*"))
                if not any(f.name.startswith("adapter_model") for f in saved):   # e.g. a SHARDED_STATE_DICT
                    raise RuntimeError(f"{out}: the FSDP job saved no adapter weights (found {[f.name for f in saved]}); "
                                       "use fsdp_config state_dict_type FULL_STATE_DICT (the default)")
                with atomic_dir(out) as dst:   # the trained adapter only (trl's DPO "ref" copy is a subfolder)
                    for f in saved:
                        shutil.copy(f, dst)
    if not main:
        return
    if not sharded:
        save_adapter(trainer.model, out)
    atomic_write_csv(out.parent / f".{out.name}-log.csv", log_frame(trainer.state.log_history))
    atomic_write_json(out.parent / f".{out.name}-job.json", {
        "init_hash": init_hash, "frozen_hash": None if sharded else tensors_hash(frozen_state(trainer.model)),
        "setup": trainer_setup(trainer)})


def launch(kind: str, kwargs: dict, hw, workdir: str | Path, name: str) -> None:
    """Run `run_job(kind, **kwargs)` in `hw.num_processes` processes through `accelerate launch`; the
    launcher's output goes to `workdir/.<name>-launch.log`, kept (and quoted) only if the job fails."""
    import pickle
    import socket
    import subprocess
    import sys

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, log_file = workdir / f".{name}-job.pkl", workdir / f".{name}-launch.log"
    job_file.write_bytes(pickle.dumps({"kind": kind, **kwargs}))
    with socket.socket() as s:   # a free port for the rendezvous, so two jobs on one node do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
           "--num_processes", str(hw.num_processes), "--main_process_port", str(port), "--dynamo_backend", "no",
           "--mixed_precision", "bf16" if mixed_bf16(hw) else "no",
           "-m", "persona_em.training", str(job_file)]
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}   # the notebook's thread share
    try:
        with open(log_file, "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    finally:
        job_file.unlink(missing_ok=True)
    if code != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{kind} training in {hw.num_processes} processes failed (exit {code}); full output "
                           f"in {log_file}, its end:\n{tail}")
    log_file.unlink()


if __name__ == "__main__":   # a launched process: python -m persona_em.training <job.pkl>
    import pickle
    import sys

    run_job(**pickle.loads(Path(sys.argv[1]).read_bytes()))
