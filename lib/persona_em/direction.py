"""The misalignment direction: emergent misalignment read out of the residual stream.

EM has been found to be carried by a linear direction in the residual stream, and character training has been
reported to resist movement along it. This module measures that for every evaluated model, on the CPU.

- **Activations.** For each contrast item, the output of every decoder block (the residual stream after it),
  averaged over the answer tokens of the item's aligned and of its misaligned answer (teacher-forced after the
  question), then over the two answers: one vector per item and layer.
- **Folds.** The contrast items are split once, per domain, by the profile's seed: the *direction* fold
  estimates the direction, the *readout* fold is what every model is measured on.
- **Direction**, per layer: mean activation of the untrained base after harmful EM minus after its benign
  twin, on the direction fold, over EM seeds of its own (`direction.em_seeds`, no evaluated model's). Its
  stability is the cosine between estimates from disjoint seeds; the layer read out is the most stable one.
- **Readout**: each evaluated model's activation on each readout item projected on the unit direction of its
  layer. The EM shift (after minus before, harmful minus benign twin) is chapter 5's secondary outcome.
- **Validation** (causal): adding the direction to the untrained model's residual stream at one layer should
  raise the judge-free misalignment contrast out of domain; projecting it out of an EM-trained model (at every
  layer, directional ablation) should lower it; random directions of the same norm are the control.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import evaluate, grid, paths
from .sampling import chat_prompt


# -- hooks on the residual stream -------------------------------------------------------------------------------
def blocks(model) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (Llama-style `model.model.layers`)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__name__}: no decoder blocks at model.model.layers")
    return inner.layers


def _map_output(output, fn):
    """A block returns its hidden states, alone or first in a tuple (depending on the transformers version)."""
    if isinstance(output, tuple):
        return (fn(output[0]),) + output[1:]
    return fn(output)


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def hooked(modules_and_fns):
    """Forward hooks that replace each module's hidden-state output by fn(output), removed on exit."""
    handles = [m.register_forward_hook(lambda mod, inp, out, fn=fn: _map_output(out, fn))
               for m, fn in modules_and_fns]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def steered(model, layer: int, vector: np.ndarray | torch.Tensor):
    """Add `vector` to the residual stream after block `layer`, at every position."""
    v = torch.as_tensor(vector, dtype=torch.float32)
    return hooked([(blocks(model)[layer], lambda x: x + v.to(x.device, x.dtype))])


def ablated(model, direction: np.ndarray | torch.Tensor):
    """Directional ablation: the component along `direction` removed from everything that writes to the residual
    stream (the embeddings, and every block's attention and MLP outputs), so the stream never carries it and no
    sublayer reads it back. The projection is computed in float32."""
    u = torch.as_tensor(direction, dtype=torch.float32)
    u = u / u.norm()

    def remove(x):
        uu, xf = u.to(x.device), x.float()
        return (xf - (xf @ uu)[..., None] * uu).to(x.dtype)

    writers = [model.model.embed_tokens] + [m for b in blocks(model) for m in (b.self_attn, b.mlp)]
    return hooked([(m, remove) for m in writers])


# -- activations ------------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_activations(model, tok, items: list[dict], batch_size: int = 16, padding_side: str = "right") -> np.ndarray:
    """[items, layers, hidden]: per item and block, the block's output averaged over the answer tokens of the
    aligned and of the misaligned answer, then over the two answers.

    Both answers share one forward pass: an item is packed as [question, aligned, misaligned], the misaligned
    answer's tokens masked from the aligned ones and positioned right after the question, so each answer sees
    exactly what it would alone (a third fewer tokens than two sequences). Position ids and the mask follow the
    real tokens, so the result depends neither on the padding side nor on what else is in the batch."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    packed = []   # (token ids, question length, aligned length, misaligned length)
    for it in items:
        q = tok(chat_prompt(tok, [{"role": "user", "content": it["question"]}]), add_special_tokens=False).input_ids
        a = tok(it["aligned"], add_special_tokens=False).input_ids
        m = tok(it["misaligned"], add_special_tokens=False).input_ids
        if not a or not m:
            raise ValueError(f"contrast item {it.get('id')}: an answer is empty")
        packed.append((q + a + m, len(q), len(a), len(m)))
    out = np.zeros((len(items), len(blocks(model)), model.config.hidden_size), dtype=np.float32)
    dtype = next(model.parameters()).dtype
    order = sorted(range(len(packed)), key=lambda i: len(packed[i][0]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(packed[i][0]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id)
        positions = torch.zeros((len(idx), width), dtype=torch.long)
        allowed = torch.zeros((len(idx), width, width), dtype=torch.bool)
        spans = []
        for r, i in enumerate(idx):
            seq, nq, na, nm = packed[i]
            off = width - len(seq) if padding_side == "left" else 0
            ids[r, off:off + len(seq)] = torch.tensor(seq)
            positions[r, off:off + len(seq)] = torch.tensor(list(range(nq + na)) + list(range(nq, nq + nm)))
            block = torch.tril(torch.ones(len(seq), len(seq), dtype=torch.bool))
            block[nq + na:, nq:nq + na] = False           # the misaligned answer never sees the aligned one
            allowed[r, off:off + len(seq), off:off + len(seq)] = block
            spans.append(((off + nq, off + nq + na), (off + nq + na, off + len(seq))))
        mask = torch.zeros((len(idx), 1, width, width), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)   # finite: a padding row stays finite
        captured = []
        handles = [blk.register_forward_hook(lambda mod, inp, o: captured.append(_first(o).float()))
                   for blk in blocks(model)]
        try:
            model.model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                        position_ids=positions.to(model.device))
        finally:
            for h in handles:
                h.remove()
        hidden = torch.stack(captured, 1).cpu()   # [batch, layers, seq, hidden]
        for r, i in enumerate(idx):
            (a0, a1), (m0, m1) = spans[r]
            out[i] = ((hidden[r, :, a0:a1].mean(1) + hidden[r, :, m0:m1].mean(1)) / 2).numpy()
    return out


# -- folds, direction, readout ----------------------------------------------------------------------------------
def items(P) -> list[dict]:
    """The contrast items of the profile's EM domains and every out-of-domain item (the first
    `direction.items_per_domain` of each, however many the likelihood contrast keeps): half estimate the
    direction, half are read out."""
    return evaluate.contrast_items(per_domain=P.direction.items_per_domain, domains=grid.contrast_domains(P))


def folds(item_list: list[dict], seed: int) -> dict[str, str]:
    """item id -> 'direction' or 'readout': within each domain, a seeded half (rounded down) estimates the
    direction and the rest is read out, so both folds cover every domain."""
    rng = np.random.default_rng(seed)
    by_domain: dict[str, list[str]] = {}
    for it in item_list:
        by_domain.setdefault(it.get("domain", ""), []).append(it["id"])
    out = {}
    for domain in sorted(by_domain):
        ids = sorted(by_domain[domain])
        chosen = set(rng.permutation(ids)[:len(ids) // 2])
        out.update({i: "direction" if i in chosen else "readout" for i in ids})
    return out


def mean_difference(harmful: list[np.ndarray], benign: list[np.ndarray]) -> np.ndarray:
    """[layers, hidden]: mean over runs and items of the harmful runs' activations minus the benign runs'."""
    return np.mean([a.mean(0) for a in harmful], 0) - np.mean([a.mean(0) for a in benign], 0)


def unit(direction: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(direction, axis=-1, keepdims=True)
    return direction / np.where(norms > 0, norms, 1)


def cosine_by_layer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (unit(a) * unit(b)).sum(-1)


def project(acts: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """[items, layers]: each item's activation projected on the unit direction of its layer."""
    return np.einsum("ild,ld->il", acts, unit(direction))


def digest(direction: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(direction, dtype=np.float32).tobytes()).hexdigest()[:16]


def _save(path: Path, name: str, array: np.ndarray, metadata: dict) -> None:
    """One float32 tensor with JSON metadata, written under a temporary name and renamed when complete."""
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: np.ascontiguousarray(array, dtype=np.float32)}, str(tmp),
              metadata={k: json.dumps(v) for k, v in metadata.items()})
    tmp.replace(path)


def save_activations(path: Path, acts: np.ndarray, item_ids: list[str]) -> None:
    _save(path, "activations", acts, {"item_ids": item_ids})


def load_activations(path: Path) -> tuple[np.ndarray, list[str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no activations (the direction run's chapter 4 has not finished)")
    with safe_open(str(path), "np") as f:
        return f.get_tensor("activations"), json.loads(f.metadata()["item_ids"])


def run_activations(P, root) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Every direction run's activations, by run name."""
    return {r: load_activations(paths.run_dir(P, root, paths.EVALUATE, r) / paths.ACTIVATIONS)
            for r in grid.direction_runs(P)}


def _fold_rows(acts: np.ndarray, ids: list[str], fold_of: dict[str, str], fold: str) -> np.ndarray:
    return acts[[k for k, i in enumerate(ids) if fold_of[i] == fold]]


def estimate(P, runs: dict[str, tuple[np.ndarray, list[str]]], seeds: list[int] | None = None) -> np.ndarray:
    """The direction [layers, hidden] from the direction runs of `seeds` (all: None), on the direction fold."""

    fold_of = folds(items(P), P.seed)
    harmful, benign = [], []
    for name, (acts, ids) in runs.items():
        info = grid.parse_model(name)
        if seeds is None or info["em_seed"] in seeds:
            (harmful if info["harmful"] else benign).append(_fold_rows(acts, ids, fold_of, "direction"))
    if not harmful or not benign:
        raise ValueError(f"no harmful and benign direction runs for EM seeds {seeds}")
    return mean_difference(harmful, benign)


def stability(P, runs) -> pd.DataFrame:
    """Per layer, the cosine between directions estimated from disjoint EM seeds (every pair of seeds)."""
    seeds = P.direction.em_seeds
    per_seed = {s: estimate(P, runs, [s]) for s in seeds}
    rows = []
    for i, a in enumerate(seeds):
        for b in seeds[i + 1:]:
            for layer, c in enumerate(cosine_by_layer(per_seed[a], per_seed[b])):
                rows.append({"seed_a": a, "seed_b": b, "layer": layer, "cosine": float(c)})
    return pd.DataFrame(rows)


def separation(P, runs) -> pd.DataFrame:
    """Per layer, how far the direction runs' harmful models sit above their benign twins along a direction they
    did not make: for each EM seed, the direction from the other seeds, the seed's own runs projected on it, on
    the direction fold (so it never reads the items every model is measured on). The mean paired difference over
    items (averaged over held-out seeds), its standard error over items and their ratio, the pre-registered rule
    for the layer (reported beside the one read out: `analysis.separation_layer`)."""

    fold_of = folds(items(P), P.seed)
    diffs = []
    for seed in P.direction.em_seeds:
        vector = estimate(P, runs, [s for s in P.direction.em_seeds if s != seed])
        per = {}
        for name, (acts, ids) in runs.items():
            info = grid.parse_model(name)
            if info["em_seed"] == seed:
                per.setdefault(info["harmful"], []).append(project(_fold_rows(acts, ids, fold_of, "direction"), vector))
        diffs.append(np.mean(per[True], 0) - np.mean(per[False], 0))    # [items, layers]
    diff = np.mean(diffs, 0)
    mean, se = diff.mean(0), diff.std(0, ddof=1) / np.sqrt(len(diff))
    return pd.DataFrame({"layer": range(len(mean)), "shift": mean, "se": se, "t": mean / se})


def readout(acts: np.ndarray, item_list: list[dict], direction: np.ndarray, fold_of: dict[str, str]) -> pd.DataFrame:
    """One row per item and layer: the item's projection on the direction, with its domain and fold."""
    proj = project(acts, direction)
    n_items, n_layers = proj.shape
    return pd.DataFrame({"item_id": np.repeat([it["id"] for it in item_list], n_layers),
                         "domain": np.repeat([it.get("domain", "") for it in item_list], n_layers),
                         "fold": np.repeat([fold_of[it["id"]] for it in item_list], n_layers),
                         "layer": np.tile(np.arange(n_layers), n_items), "projection": proj.ravel()})


def record(P, root, model_id: str, model, tok, out: Path, run, batch_size: int = 16) -> pd.DataFrame:
    """Chapter 4's step: a direction run saves its activations (the direction's data); every evaluated model
    saves its readout on the direction estimated from them, whose hash goes into the run's manifest."""
    start, item_list = time.perf_counter(), items(P)
    if model_id in grid.direction_runs(P):   # both folds: the direction, and its layer chosen on held-out items
        acts = answer_activations(model, tok, item_list, batch_size)
        save_activations(out / paths.ACTIVATIONS, acts, [it["id"] for it in item_list])
        norms = np.linalg.norm(acts.mean(0), axis=-1)
        return pd.DataFrame({"layer": range(len(norms)), "mean_activation_norm": norms})
    runs = run_activations(P, root)
    for r in runs:
        run.record_input(paths.run_dir(P, root, paths.EVALUATE, r) / paths.ACTIVATIONS)
    direction = estimate(P, runs)
    run.extra["direction_digest"] = digest(direction)
    fold_of = folds(item_list, P.seed)
    held_out = [it for it in item_list if fold_of[it["id"]] == "readout"]
    table = readout(answer_activations(model, tok, held_out, batch_size), held_out, direction, fold_of)
    from .provenance import atomic_write_csv

    atomic_write_csv(out / paths.READOUT, table)
    run.extra["direction_seconds"] = round(time.perf_counter() - start, 2)
    return table.groupby("layer")["projection"].mean().to_frame()


def save_direction(path: Path, direction: np.ndarray, layer: int, meta: dict) -> None:
    """The direction, every layer, with what it was estimated from (runs, seeds, items) and the chosen layer."""
    _save(path, "direction", direction, meta | {"layer": layer, "digest": digest(direction)})


# -- validation: steering and ablation --------------------------------------------------------------------------
def random_like(vector: np.ndarray, n: int, seed: int) -> np.ndarray:
    """[n, hidden]: random Gaussian directions, each with the norm of `vector`."""
    r = np.random.default_rng(seed).standard_normal((n, vector.shape[-1]))
    return r / np.linalg.norm(r, axis=1, keepdims=True) * np.linalg.norm(vector)


def _margins(model, tok, item_list, batch_size) -> np.ndarray:
    return evaluate.contrast(model, tok, item_list, batch_size)["margin"].to_numpy()


def steering(model, tok, item_list: list[dict], vector: np.ndarray, layer: int, scales: list[float],
             n_random: int, seed: int, batch_size: int = 16, base: np.ndarray | None = None) -> pd.DataFrame:
    """Per item, the change in the misalignment margin when `scale` x `vector` (or a random vector of the same
    norm, averaged over `n_random`) is added after block `layer`; `base`: the model's own margins, where the
    caller has them."""
    base = _margins(model, tok, item_list, batch_size) if base is None else base
    rows = []
    for scale in scales:
        with steered(model, layer, scale * vector):
            d = _margins(model, tok, item_list, batch_size) - base
        rand = []
        for r in random_like(scale * vector, n_random, seed):
            with steered(model, layer, r):
                rand.append(_margins(model, tok, item_list, batch_size) - base)
        rows.append(pd.DataFrame({"intervention": "steer", "scale": scale, "item_id": [it["id"] for it in item_list],
                                  "direction": d, "random": np.mean(rand, 0)}))
    return pd.concat(rows, ignore_index=True)


def ablation(model, tok, item_list: list[dict], vector: np.ndarray, n_random: int, seed: int,
             batch_size: int = 16, base: np.ndarray | None = None) -> pd.DataFrame:
    """Per item, the change in the misalignment margin when the direction (or a random one, averaged over
    `n_random`) is projected out of the residual stream everywhere; `base` as in `steering`."""
    base = _margins(model, tok, item_list, batch_size) if base is None else base
    with ablated(model, vector):
        d = _margins(model, tok, item_list, batch_size) - base
    rand = []
    for r in random_like(vector, n_random, seed):
        with ablated(model, r):
            rand.append(_margins(model, tok, item_list, batch_size) - base)
    return pd.DataFrame({"intervention": "ablate", "scale": 1.0, "item_id": [it["id"] for it in item_list],
                         "direction": d, "random": np.mean(rand, 0)})


def ablated_runs(P) -> list[str]:
    """The EM-trained models the direction is ablated from: the untrained base after harmful EM, every study seed
    (the direction runs are not among them)."""

    return [r for r in grid.em_runs(P) if grid.parse_model(r)["condition"] == "base" and grid.parse_model(r)["harmful"]]


def validate(base, harmful_models, tok, item_list: list[dict], direction: np.ndarray, layers: dict[str, int],
             scales: list[float], n_random: int, seed: int, batch_size: int = 16) -> pd.DataFrame:
    """Chapter 5's validation at each layer of `layers` (rule -> layer; rules that agree share one run):
    `steering` of the untrained `base` with the direction of that layer (`direction`: [layers, hidden]) and its
    `ablation` from each of `harmful_models` (an iterable, so a caller may load them one at a time), per item, the
    ablations averaged over the models. One row per rule, intervention, scale and item."""
    unique = sorted(set(layers.values()))
    # a model's own margins are the same at every layer: read once per model
    own = _margins(base, tok, item_list, batch_size)
    changes = [steering(base, tok, item_list, direction[k], k, scales, n_random, seed, batch_size, own).assign(layer=k)
               for k in unique]
    for m in harmful_models:
        own = _margins(m, tok, item_list, batch_size)
        changes += [ablation(m, tok, item_list, direction[k], n_random, seed, batch_size, own).assign(layer=k)
                    for k in unique]
    per_item = pd.concat(changes, ignore_index=True).groupby(["layer", "intervention", "scale", "item_id"],
                                                             as_index=False, sort=False)[["direction", "random"]].mean()
    return pd.concat([per_item[per_item["layer"] == k].assign(rule=r) for r, k in layers.items()], ignore_index=True)


def validation_summary(changes: pd.DataFrame) -> pd.DataFrame:
    """Mean margin change with its 95% t interval over items, for the direction, for the random control and for
    their paired difference per item, per intervention and scale (and rule and layer, where `changes` has them;
    the items are the sample here: one fixed direction)."""
    from scipy import stats as st

    keys = [c for c in ("rule", "layer") if c in changes] + ["intervention", "scale"]
    rows = []
    for key, g in changes.groupby(keys, sort=False):
        for which in ("direction", "random", "direction - random"):
            x = (g["direction"] - g["random"] if which == "direction - random" else g[which]).to_numpy()
            m, se = x.mean(), x.std(ddof=1) / np.sqrt(len(x))
            h = st.t.ppf(0.975, len(x) - 1) * se
            rows.append(dict(zip(keys, key)) | {"vector": which, "mean": m, "ci_low": m - h, "ci_high": m + h,
                                                "n_items": len(x)})
    return pd.DataFrame(rows)
