"""A thin TubeViT: the fused tube tokenizer (models/tube_tokenizer.py) + pre-norm ViT blocks
(models/blocks.py) over a packed token buffer (models/packed.py: joint image + video batches of
any shapes in one pass, no padding) + attention-pooling readout + named linear heads.

Image-to-video scaling (paper §3.6): ``enable_image_to_video_scaling(s)``
freezes blocks 0..s-1 and changes block s to
``z_s = MLP(LN(y_s)) + y_s + tanh(alpha) * z_0`` with ``z_0`` the tube
tokens and ``alpha`` a learned scalar initialised to 0 (so at that point the
model computes exactly what it did before).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..geometry import PAPER_TUBES
from .blocks import ACTIVATIONS, AttentionPool, Block
from .packed import PackedLayout, _varlen_attn
from .tube_tokenizer import TubeTokenizer


def _json_config(args: dict) -> dict:
    """The constructor's arguments in JSON form: what save_pretrained writes and model_from_config
    (models/pretrained.py) reads back."""
    cfg = dict(args)
    n = cfg["num_classes"]
    cfg["num_classes"] = dict(n) if isinstance(n, dict) else {"default": n}
    from ..geometry import as_tubes
    cfg["tubes"] = [[list(t.kernel), list(t.stride), list(t.offset)] for t in as_tubes(cfg["tubes"])]
    s2d = cfg["space_to_depth"]
    cfg["space_to_depth"] = None if s2d is None else {str(k): list(v) for k, v in dict(s2d).items()}
    cfg["pre_norm"] = bool(cfg["pre_norm"])
    return cfg


class TubeViT(nn.Module):
    """TubeViT classifier.

    Args:
        dim, depth, num_heads, mlp_dim: ViT sizes (``heads=`` is a deprecated alias of num_heads).
        num_classes: an int (one head named "default") or {head name: classes}.
        in_channels, tubes, kernels, space_to_depth, image_tube: see TubeTokenizer.
        drop_rate: dropout after the attention and MLP projections, in the MLP, and on the
            pooled features before the heads (timm's drop_rate).
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, per sample, rising linearly from 0 at the first block
            to drop_path_rate at the last (timm's schedule). All three default to 0: no change.
        pre_norm: a LayerNorm over the tokens before the first block (``norm_pre``, timm's name;
            CLIP's ``ln_pre``), as CLIP vision towers have. Default False.
        act: the blocks' MLP activation, "gelu" (default; timm, torchvision, HuggingFace ViT,
            most OpenCLIP models) or "quick_gelu" (OpenAI's CLIP weights, OpenCLIP's
            ``*-quickgelu`` models).
    Inputs: a video batch (B, C, T, H, W), an image batch (B, C, H, W), or a list of single
    samples (C, T, H, W) / (C, H, W) of any sizes (a joint batch).

    timm's interface: num_features, forward_features (per-token features), forward_head
    (pooling + head, pre_logits), get_classifier, reset_classifier, no_weight_decay,
    get_intermediate_layers, set_grad_checkpointing.
    """

    def __init__(self, *, dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_dim: int = 3072,
                 num_classes: Union[int, Dict[str, int]] = 400, in_channels: int = 3, tubes=PAPER_TUBES,
                 kernels: str = "per_tube", space_to_depth=None, image_tube: Optional[int] = None,
                 eps: float = 1e-6, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, pre_norm: bool = False, act: str = "gelu",
                 heads: Optional[int] = None):
        super().__init__()
        if heads is not None:
            warnings.warn("TubeViT(heads=...) is deprecated: use num_heads= (timm's name; `heads` are the "
                          "classifiers)", FutureWarning, stacklevel=2)
            num_heads = heads
        # the constructor's arguments, from its signature (heads folded into num_heads)
        args = {k: v for k, v in locals().items() if k in inspect.signature(TubeViT.__init__).parameters
                and k not in ("self", "heads")}
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                           ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        self.dim = self.num_features = dim
        self.tokenizer = TubeTokenizer(in_channels, dim, tubes, kernels=kernels, space_to_depth=space_to_depth,
                                       image_tube=image_tube)
        self.config = _json_config(args)  # what save_pretrained writes, model_from_config reads
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.norm_pre = nn.LayerNorm(dim, eps=eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_dim, eps, drop_rate, attn_drop_rate, r, act)
                                    for r in rates)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pool = AttentionPool(dim, num_heads, mlp_dim, eps)
        self.head_drop = nn.Dropout(drop_rate)
        if isinstance(num_classes, int):
            num_classes = {"default": num_classes}
        if not num_classes:
            raise ValueError("num_classes must name at least one head")
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) if n > 0 else nn.Identity()
                                    for name, n in num_classes.items()})
        self.scaling_layer: Optional[int] = None
        self.grad_checkpointing = False

    def save_pretrained(self, directory: str) -> None:
        """config.json (the constructor's arguments, image-to-video scaling) and the weights
        (model.safetensors when the safetensors package is installed, else model.pt)."""
        from .pretrained import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, map_location="cpu") -> "TubeViT":
        """The model save_pretrained wrote to ``directory``; refuses weights that do not match
        the configuration, naming the parameter."""
        from .pretrained import from_pretrained
        return from_pretrained(directory, map_location)

    def use_varlen_attention(self, enable: bool = True) -> None:
        """Joint batches on CUDA in fp16 / bf16 (autocast included): attention over the whole
        packed buffer in one FlashAttention varlen call (``torch.nn.attention.varlen``) instead of
        one ``scaled_dot_product_attention`` per group of equal-length samples, so a batch of many
        shapes costs one launch per block, not one per shape. Elsewhere (CPU, fp32, one shape
        group, attention dropout in training, head sizes FlashAttention does not take) the
        per-group path runs. Off by default."""
        if enable and _varlen_attn is None:
            raise RuntimeError(f"varlen attention needs torch.nn.attention.varlen (torch >= 2.10), "
                               f"this is torch {torch.__version__}")
        for blk in self.blocks:
            blk.attn.varlen = bool(enable)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of
        keeping them (``torch.utils.checkpoint``, non-reentrant; timm's name
        for the switch). A block then keeps only its input for backward
        (tested: what a block saves falls ~17x at d = 48, 2 clips),
        for one extra block forward per step: the usual trade for training
        ViT-L/H at 64 frames (1176 tokens per clip) in less memory."""
        self.grad_checkpointing = bool(enable)

    # ---------------------------------------------------------------- scaling
    def enable_image_to_video_scaling(self, layer: int) -> None:
        """Freeze blocks before `layer`; gate the tube tokens into block `layer`."""
        if not 0 <= layer < len(self.blocks):
            raise ValueError(f"layer must be in [0, {len(self.blocks)}), got {layer}")
        for blk in self.blocks[:layer]:
            blk.requires_grad_(False)
        blk = self.blocks[layer]
        # one element, not 0-d: FSDP2 (fully_shard) shards every parameter along dim 0 and refuses scalars
        blk.gate_alpha = nn.Parameter(torch.zeros(1, device=self.norm.weight.device, dtype=self.norm.weight.dtype))
        self.scaling_layer = layer

    # ---------------------------------------------------------------- forward
    def _blocks(self, tokens: torch.Tensor, layout: PackedLayout, keep=()) -> Tuple[torch.Tensor, list]:
        """The blocks and the final norm over a packed buffer: (normed tokens, the outputs of the
        blocks whose indices are in ``keep``). The image-to-video gate adds z0, the sequence the
        first block receives (the tokenizer's output, after norm_pre when pre_norm)."""
        x = self.norm_pre(tokens)
        z0, kept = x, []
        for i, blk in enumerate(self.blocks):
            z = z0 if i == self.scaling_layer else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, layout, z, use_reentrant=False)
            else:
                x = blk(x, layout, z)
            if i in keep:
                kept.append(x)
        return self.norm(x), kept

    def _encode(self, tokens: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        return self.pool(self._blocks(tokens, layout)[0], layout)  # (samples, d), buffer order

    def _check_head(self, head: Optional[str]) -> str:
        if head is None:
            if len(self.heads) > 1:  # no silent choice between datasets' heads
                raise ValueError(f"this model has {len(self.heads)} heads {list(self.heads)}: pass head=<name>")
            return next(iter(self.heads))
        if head not in self.heads:
            raise ValueError(f"unknown head {head!r}; heads are {list(self.heads)}")
        return head

    def forward(self, x, head=None):
        """Same-shape batch (B, C, T, H, W) or (B, C, H, W) -> logits (B, classes) of ``head``.

        A list of single samples of any shapes (videos (C, T, H, W), images (C, H, W)) -> a list
        of logits, one per sample, ``head`` one name for all or one per sample: the joint batch
        of forward_mixed, through the module's own call (so wrappers such as
        DistributedDataParallel see it; ``losses_by_head`` turns the logits into joint_loss's
        losses). ``head`` may be omitted only when the model has one head."""
        if isinstance(x, (list, tuple)):
            heads = list(head) if isinstance(head, (list, tuple)) else [head] * len(x)
            return self.forward_mixed(x, heads)
        head = self._check_head(head)
        return self.forward_head(self.forward_features(x), head=head)

    # ---------------------------------------------------------------- timm's interface
    def forward_features(self, x):
        """Per-token features after the blocks and the final norm: a same-shape batch ->
        (B, N, d); a list of samples of any shapes -> a list of (N_i, d), input order."""
        if isinstance(x, (list, tuple)):
            tokens, layout = self.pack(x)
            per = layout.per_sample(self._blocks(tokens, layout)[0])
            out = [None] * len(per)
            for j, i in enumerate(layout.order):
                out[i] = per[j]
            return out
        tokens = self.tokenizer(x)  # (B, N, d)
        B, N, d = tokens.shape
        return self._blocks(tokens.reshape(B * N, d), PackedLayout(((B, N),)))[0].view(B, N, d)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, head: Optional[str] = None):
        """Per-token features (B, N, d) (forward_features) -> attention pooling -> (B, d) when
        ``pre_logits``, else the logits of ``head`` (B, classes)."""
        B, N, d = x.shape
        pooled = self.head_drop(self.pool(x.reshape(B * N, d), PackedLayout(((B, N),))))
        return pooled if pre_logits else self.heads[self._check_head(head)](pooled)

    def get_classifier(self, head: Optional[str] = None) -> nn.Module:
        return self.heads[self._check_head(head)]

    def reset_classifier(self, num_classes: int, head: Optional[str] = None) -> None:
        """A new, freshly initialised head (num_classes = 0: nn.Identity, the pooled features)."""
        name = self._check_head(head)
        w = self.norm.weight
        self.heads[name] = (nn.Linear(self.dim, num_classes).to(device=w.device, dtype=w.dtype) if num_classes > 0
                            else nn.Identity())
        self.config["num_classes"][name] = num_classes

    def no_weight_decay(self) -> set:
        """Parameters a fine-tuning recipe keeps out of weight decay: the pooling probe and the
        image-to-video gate (the position embedding is fixed, not a parameter)."""
        return {"pool.probe"} | {f"blocks.{i}.gate_alpha" for i, b in enumerate(self.blocks)
                                 if b.gate_alpha is not None}

    def get_intermediate_layers(self, x: torch.Tensor, n=1, norm: bool = False) -> List[torch.Tensor]:
        """Per-token outputs (B, N, d) of the last ``n`` blocks (an int) or of the blocks at the
        given indices (a sequence), optionally through the final norm."""
        depth = len(self.blocks)
        idx = list(range(depth - n, depth)) if isinstance(n, int) else [i % depth for i in n]
        tokens = self.tokenizer(x)
        B, N, d = tokens.shape
        _, kept = self._blocks(tokens.reshape(B * N, d), PackedLayout(((B, N),)), keep=set(idx))
        by_index = dict(zip(sorted(set(idx)), kept))
        return [(self.norm(by_index[i]) if norm else by_index[i]).view(B, N, d) for i in idx]

    def pack(self, samples: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, PackedLayout]:
        """Tokenize a list of single samples of any shapes into one packed buffer."""
        if len(samples) == 0:
            raise ValueError("samples must not be empty")
        groups: Dict[tuple, List[int]] = {}
        for i, s in enumerate(samples):
            if not isinstance(s, torch.Tensor) or s.dim() not in (3, 4):
                raise ValueError(f"samples[{i}] must be a (C, T, H, W) video or a (C, H, W) image tensor, "
                                 f"got {getattr(s, 'shape', type(s).__name__)}")
            groups.setdefault(tuple(s.shape), []).append(i)
        chunks, slabs, order = [], [], []
        for idx in groups.values():
            tok = self.tokenizer(torch.stack([samples[i] for i in idx]))  # one fused call per shape
            chunks.append(tok.reshape(-1, tok.shape[-1]))
            slabs.append((len(idx), tok.shape[1]))
            order += idx
        buf = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return buf, PackedLayout(tuple(slabs), tuple(order))

    def forward_pooled(self, samples: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mixed list of images/videos -> pooled features (len(samples), d), input order."""
        tokens, layout = self.pack(samples)
        feats = self._encode(tokens, layout)
        inverse = torch.empty(len(layout.order), dtype=torch.long)
        inverse[torch.tensor(layout.order)] = torch.arange(len(layout.order))
        return feats[inverse.to(feats.device)]

    def forward_mixed(self, samples: Sequence[torch.Tensor], heads: Sequence[str]) -> List[torch.Tensor]:
        """Mixed list + a head name per sample -> list of (classes,) logits."""
        if len(heads) != len(samples):
            raise ValueError(f"heads must name one head per sample ({len(samples)}), got {len(heads)}")
        feats = self.head_drop(self.forward_pooled(samples))
        return [self.heads[self._check_head(h)](f) for f, h in zip(feats, heads)]

    def joint_loss(self, samples: Sequence[torch.Tensor], heads: Sequence[str], labels: Sequence[int],
                   weights: Optional[Dict[str, float]] = None):
        """Cross-entropy for joint image+video training in one forward pass.

        Each head's loss is the mean over its samples; the total is their
        weighted sum (weights default to 1). Returns (total, {head: loss}).
        """
        if not (len(samples) == len(heads) == len(labels)):
            raise ValueError("samples, heads and labels must have the same length")
        return losses_by_head(self(list(samples), head=list(heads)), heads, labels, weights)


def losses_by_head(logits: Sequence[torch.Tensor], heads: Sequence[str], labels: Sequence[int],
                   weights: Optional[Dict[str, float]] = None, label_smoothing: float = 0.0):
    """(total, {head: loss}) from per-sample logits (a joint forward's list): each head's loss is
    the cross-entropy mean over its samples (16-bit logits in fp32; ``label_smoothing``), the total
    their weighted sum (weights default 1). ``labels``: class indices, or one (classes,) tensor of
    class probabilities per sample (mixup / cutmix targets)."""
    if not (len(logits) == len(heads) == len(labels)):
        raise ValueError("logits, heads and labels must have the same length")
    device = logits[0].device
    soft = isinstance(labels[0], torch.Tensor) and labels[0].dim() == 1  # class probabilities (mixup)
    labels = [t.to(device) for t in labels] if soft else torch.as_tensor(list(labels), device=device)
    total, per_head = 0.0, {}
    for name in dict.fromkeys(heads):
        idx = [i for i, h in enumerate(heads) if h == name]
        lg = torch.stack([logits[i] for i in idx])
        lg = lg.float() if lg.dtype in (torch.float16, torch.bfloat16) else lg
        target = torch.stack([labels[i] for i in idx]).to(lg.dtype) if soft else labels[idx]
        loss = F.cross_entropy(lg, target, label_smoothing=label_smoothing)
        per_head[name] = loss
        total = total + (weights or {}).get(name, 1.0) * loss
    return total, per_head
