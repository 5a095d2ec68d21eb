"""Character training: DPO with LoRA through trl, as Open Character Training does it.

The LoRA adapter is created here (not inside the trainer) right after seeding, so its initial weights depend
on the character seed alone. The reference model is the same network with the adapter disabled. OCT's NLL
term on the chosen answers is trl's `sft` loss added with weight `nll_coef`.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pandas as pd
import torch

from .config import CharacterConfig, LoraConfig


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
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def common_args(cfg, seed: int, out: str) -> dict:
    """Trainer arguments shared by every training stage: one trainer, optimizer and precision for all
    conditions of a profile (DESIGN 6.3)."""
    return dict(output_dir=out, per_device_train_batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
                warmup_steps=cfg.warmup_steps, lr_scheduler_type="linear", optim="adamw_torch", seed=seed,
                data_seed=seed, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
                disable_tqdm=False)


def log_frame(history: list[dict]) -> pd.DataFrame:
    rows = [h for h in history if "loss" in h]
    frame = pd.DataFrame(rows)
    frame = frame.rename(columns={"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
                                  "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected"})
    first = ["step", "epoch", "loss"]
    return frame[[c for c in first if c in frame] + [c for c in frame if c not in first]]


def train_dpo(model, tok, rows: list[dict], cfg: CharacterConfig, seed: int):
    """Train a LoRA on `rows` (conversational prompt/chosen/rejected). Returns (peft_model, log, init_hash)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    peft_model = seeded_lora(model, cfg.lora, seed)
    init_hash = tensors_hash(lora_state(peft_model))
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(**common_args(cfg, seed, out), beta=cfg.beta, loss_type=["sigmoid", "sft"],
                         loss_weights=[1.0, cfg.nll_coef], max_length=cfg.max_length)
        trainer = DPOTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        trainer.train()
    return trainer.model, log_frame(trainer.state.log_history), init_hash


def save_adapter(peft_model, path: str | Path) -> None:
    from .provenance import atomic_dir

    with atomic_dir(path) as tmp:
        # trl adds a frozen "ref" copy of the initial adapter for DPO's reference model; keep only ours.
        peft_model.save_pretrained(tmp, selected_adapters=["default"])
