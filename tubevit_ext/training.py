"""The training recipe's pieces, used by ``tubevit train`` (cli.py) and usable on their own:
mixed precision, parameter groups with layer-wise learning-rate decay, the EMA of the weights,
the learning-rate schedules, the step with gradient accumulation and clipping, a JSON-lines metrics
log and the RNG state a resumed run restores. Everything a checkpoint keeps of them is plain
containers and tensors, so checkpoints load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

PRECISIONS = ("bf16", "fp16", "fp32")


def default_precision(device: torch.device) -> str:
    """bf16 on a CUDA device that supports it, else fp32 (the CPU's default: bf16 autocast works
    there too, and is faster only where the CPU has native bf16, e.g. AMX)."""
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


class Precision:
    """Autocast and, for fp16, a gradient scaler. ``autocast()`` is the forward's context; the
    scaler is None where none is needed (bf16 keeps fp32's exponent range)."""

    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
        self.name, self.device = name, device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> List[dict]:
    """AdamW parameter groups: no weight decay for biases, norms, 1-element parameters and what
    ``model.no_weight_decay()`` names; with ``layer_decay`` the learning rate of layer l of L
    (0: the tokenizer and norm_pre, 1..L-2: the blocks, L-1: the final norm, pooling and heads) is
    scaled by layer_decay ** (L - 1 - l) (BEiT's rule, the standard when fine-tuning from an image
    ViT). Each group carries its ``lr_scale``, which make_schedule applies."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    depth = len(getattr(model, "blocks", []))
    num_layers = depth + 2

    def layer_of(name: str) -> int:
        if name.startswith(("tokenizer.", "norm_pre.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return num_layers - 1

    groups: Dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name in skip or name.endswith(".bias")
        layer = layer_of(name)
        scale = layer_decay ** (num_layers - 1 - layer) if layer_decay is not None else 1.0
        key = (layer if layer_decay is not None else 0, no_wd)
        g = groups.setdefault(key, dict(params=[], weight_decay=0.0 if no_wd else weight_decay, lr_scale=scale,
                                        layer=layer if layer_decay is not None else None))
        g["params"].append(p)
    return list(groups.values())


def make_schedule(optimizer, name: str, lr: float, total_steps: int, warmup_steps: int, warmup_fraction: float):
    """``onecycle`` (warmup_fraction of the steps up, then cosine down) or ``cosine`` (linear warmup
    over warmup_steps, then cosine to 0); each group peaks at lr times its lr_scale (layer decay)."""
    total_steps = max(total_steps, 1)
    peaks = [lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps,
                                                   pct_start=min(0.3, warmup_fraction))
    if name != "cosine":
        raise ValueError(f"schedule must be onecycle or cosine, got {name!r}")
    for g, peak in zip(optimizer.param_groups, peaks):
        g["lr"] = g["initial_lr"] = peak
    warm = min(max(warmup_steps, 0), total_steps - 1)

    def factor(step):
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total_steps - warm, 1)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of a model's parameters, starting as a copy of the model:
    ema = decay * ema + (1 - decay) * param after every optimizer step (one fused lerp over all
    parameters). Not torch.optim.swa_utils.AveragedModel: it keeps the copy's buffers in sync with
    the model's by copying, which fails on TubeViT's position-embedding cache (a buffer whose shape
    follows the input size)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        mine = [p for p in self.module.parameters()]
        theirs = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, sd):
        self.module.load_state_dict(sd)


def mix_batch(samples: List[torch.Tensor], labels: List[int], heads: List[str], num_classes: Dict[str, int],
              mixup: float = 0.0, cutmix: float = 0.0, generator: Optional[torch.Generator] = None):
    """Mixup / CutMix of whole clips: each sample is mixed with another of its head (a joint batch
    mixes within a head; samples of another shape are left alone), with one lambda ~ Beta(alpha,
    alpha) per batch. CutMix pastes one box, the same in every frame of the clip, and sets lambda to
    the kept area. With both on, each batch takes one of them at random. Returns (samples, soft
    targets: one (classes,) float tensor per sample, lambda * onehot(y) + (1 - lambda) *
    onehot(y_partner), summing to one, and lambda)."""
    alpha, use_cut = (mixup, False) if not cutmix else (cutmix, True) if not mixup else \
        ((cutmix, True) if bool(torch.rand((), generator=generator) < 0.5) else (mixup, False))
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    out, targets = list(samples), []
    groups: Dict[tuple, List[int]] = {}
    for i, (s, h) in enumerate(zip(samples, heads)):
        groups.setdefault((h, tuple(s.shape)), []).append(i)
    partner = list(range(len(samples)))
    for idx in groups.values():
        perm = torch.randperm(len(idx), generator=generator).tolist()
        for a, b in zip(idx, [idx[j] for j in perm]):
            partner[a] = b
    box = None
    if use_cut and lam < 1.0:
        H, W = samples[0].shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = (int(torch.randint(0, n, (1,), generator=generator)) for n in (H, W))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the area kept
        box = (y0, y1, x0, x1)
    for i, s in enumerate(samples):
        j = partner[i]
        if j != i:
            if box is not None and s.shape[-2:] == samples[0].shape[-2:]:
                y0, y1, x0, x1 = box
                mixed = s.clone()
                mixed[..., y0:y1, x0:x1] = samples[j][..., y0:y1, x0:x1]  # every frame: the same box
                out[i] = mixed
            elif box is None:
                out[i] = lam * s + (1.0 - lam) * samples[j]
        n = num_classes[heads[i]]
        t = torch.zeros(n, dtype=torch.float32, device=s.device)
        t[labels[i]] += lam if j != i else 1.0
        if j != i:
            t[labels[j]] += 1.0 - lam
        targets.append(t)
    return out, targets, lam


def optimizer_step(model, optimizer, precision: Precision, clip_grad: Optional[float]) -> Optional[float]:
    """One optimizer step after the accumulated backward passes: unscale (fp16), clip the global
    gradient norm to ``clip_grad`` when given, step, update the scaler, zero the gradients.
    Returns the gradient norm before clipping (None when not clipping)."""
    norm = None
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer)
    if clip_grad:
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad))
    if precision.scaler is not None:
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def rng_state() -> dict:
    """Every generator a training step draws from (torch CPU and CUDA, Python, NumPy), as tensors
    and plain containers."""
    state = dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]),
                 python_pos=random.getstate()[2], numpy=torch.from_numpy(np.random.get_state()[1].copy()),
                 numpy_pos=int(np.random.get_state()[2]))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """RUN_DIR/metrics.jsonl: one JSON object per line ({"kind": "step" | "epoch", ...}); appends,
    so a resumed run continues the file. Only the main process writes."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.t_wait = self.t_total = 0.0
        self.clips = 0
        self.t_mark = time.perf_counter()

    def write(self, **row) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def waited(self, seconds: float, clips: int) -> None:
        self.t_wait += seconds
        self.clips += clips

    def window(self) -> dict:
        """Throughput since the last call: clips/s and the fraction of the time spent waiting for data."""
        now = time.perf_counter()
        span = max(now - self.t_mark, 1e-9)
        out = dict(clips_per_s=self.clips / span, data_wait=min(self.t_wait / span, 1.0))
        self.t_mark, self.t_wait, self.clips = now, 0.0, 0
        return out


__all__ = ["PRECISIONS", "default_precision", "Precision", "param_groups", "make_schedule", "EMA", "mix_batch",
           "optimizer_step", "rng_state", "set_rng_state", "MetricsLog"]
