"""Initialise a TubeViT from an image ViT state_dict (torchvision, timm or HuggingFace format).

Mapping (no download: the caller brings the state_dict):
* encoder blocks map one to one (torchvision ``encoder.layers.encoder_layer_i.*``,
  timm ``blocks.i.*``, HuggingFace ViT ``[vit.]encoder.layer.i.*`` (the google/vit-*
  checkpoints) or ``[vit.]layers.i.*`` (transformers 5) -> ``blocks.i.*``; torchvision's
  ``in_proj`` is q,k,v stacked like timm's ``qkv``, HuggingFace's separate q, k, v are
  stacked the same way), final norm -> ``norm``;
* the 16x16 patch kernel becomes the image (2D) tube's kernel, exactly;
* 3D tube kernels are inflated from it: resized to (kh, kw) (area averaging when
  shrinking, bilinear when growing) and scaled by 16*16/(kh*kw) (so a constant patch gives the same response),
  repeated over kt frames and divided by kt (so a static video gives the same
  response as its frame: I3D-style inflation). Biases copy the patch bias.
  Space-to-depth tubes (d/S channels) take the first d/S output channels.
* not used: the class token, the learned position embedding (TubeViT uses
  the fixed sin/cos one) and the classification head (the readout differs);
  they are returned so the caller can see what was left out.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch
import torch.nn.functional as F

from .tubevit import TubeViT


def inflate_kernel(w2d: torch.Tensor, kernel) -> torch.Tensor:
    """(d, C, ph, pw) image patch kernel -> (d, C, kt, kh, kw) tube kernel (see module doc)."""
    kt, kh, kw = kernel
    ph, pw = w2d.shape[-2:]
    w = w2d.double()
    if (kh, kw) != (ph, pw):
        # shrinking: area (block) averaging, so an integer factor preserves the
        # kernel's sum exactly after the area scale; growing: bilinear
        shrink = kh <= ph and kw <= pw
        w = (F.interpolate(w, size=(kh, kw), mode="area") if shrink else
             F.interpolate(w, size=(kh, kw), mode="bilinear", align_corners=False)) * (ph * pw) / (kh * kw)
    return (w[:, :, None].expand(-1, -1, kt, -1, -1) / kt).to(w2d.dtype).contiguous()


_TV = [(r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
       (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
       (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_weight$", r"blocks.\1.attn.qkv.weight"),
       (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_bias$", r"blocks.\1.attn.qkv.bias"),
       (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
       (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
       (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.3\.", r"blocks.\1.mlp.fc2."),
       (r"^encoder\.ln\.", "norm.")]
_TIMM = [(r"^blocks\.(\d+)\.", r"blocks.\1."), (r"^norm\.", "norm.")]


# HuggingFace ViT (ViTModel / ViTForImageClassification): both key layouts, relative to the
# model prefix ("" or "vit."). Group 1 is the block index.
_HF_BLOCK = [(r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.", "norm1."),
             (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.", "norm2."),
             (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", "attn.proj."),
             (r"layers\.(\d+)\.attention\.o_proj\.", "attn.proj."),
             (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", "mlp.fc1."),
             (r"encoder\.layer\.(\d+)\.output\.dense\.", "mlp.fc2."),
             (r"layers\.(\d+)\.mlp\.(fc[12])\.", None)]
_HF_QKV = r"(?:encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)|layers\.(\d+)\.attention\.([qkv])_proj)\.(weight|bias)$"
_HF_PATCH = "embeddings.patch_embeddings.projection."


def _hf_prefix(state_dict) -> str:
    for k in state_dict:
        if k.endswith(_HF_PATCH + "weight"):
            return k[:-len(_HF_PATCH + "weight")]
    return None


def _from_huggingface(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """A HuggingFace ViT state_dict in timm's layout (q, k, v stacked into qkv); keys it does not
    map keep their names."""
    out, qkv = {}, {}
    for key, value in state_dict.items():
        rel = key[len(prefix):] if key.startswith(prefix) else None
        if rel is None:
            out[key] = value
            continue
        m = re.match(_HF_QKV, rel)
        if m:
            i = m.group(1) or m.group(3)
            part = {"query": "q", "key": "k", "value": "v"}.get(m.group(2), m.group(4))
            qkv.setdefault((i, m.group(5)), {})[part] = value
            continue
        if rel.startswith(_HF_PATCH):
            out["patch_embed.proj." + rel[len(_HF_PATCH):]] = value
            continue
        if rel.startswith("layernorm."):
            out["norm." + rel[len("layernorm."):]] = value
            continue
        for pat, rep in _HF_BLOCK:
            m = re.match(pat, rel)
            if m:
                target = rep if rep is not None else f"mlp.{m.group(2)}."
                out[f"blocks.{m.group(1)}.{target}" + rel[m.end():]] = value
                break
        else:
            out[key] = value
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"block {i}: the state_dict has {sorted(parts)} of q, k, v {kind}s, not all three")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# Keys an image ViT has that TubeViT does not use: class token, learned position embedding,
# classification head(s), pre-logits; anything else unmapped is an error, listed.
_KNOWN_UNUSED = re.compile(r"(^|\.)(class_token|cls_token|pos_embed|pos_embedding|position_embeddings|"
                           r"heads?|classifier|pre_logits|fc_norm|reg_token|dist_token|head_dist|pooler)(\.|$)")


def load_image_vit(model: TubeViT, state_dict: Dict[str, torch.Tensor], fmt: str = "auto",
                   strict: bool = True) -> List[str]:
    """Copies an image ViT's weights into ``model``; returns the keys it did not use (class
    token, learned position embedding, classification head).

    fmt: "torchvision" (vit_b_16 & co), "timm" (vit_base_patch16_224 & co), "huggingface"
    (transformers' ViTModel / ViTForImageClassification, google/vit-*) or "auto".
    strict: raise ValueError listing the keys that are neither mapped nor known to be unused
    (False: return them with the others).
    """
    if fmt not in ("auto", "torchvision", "timm", "huggingface"):
        raise ValueError(f"fmt must be 'auto', 'torchvision', 'timm' or 'huggingface', got {fmt!r}")
    if fmt == "auto":
        fmt = ("torchvision" if "conv_proj.weight" in state_dict else
               "timm" if "patch_embed.proj.weight" in state_dict else
               "huggingface" if _hf_prefix(state_dict) is not None else None)
        if fmt is None:
            raise ValueError("cannot tell the state_dict format: no conv_proj.weight (torchvision), "
                             "patch_embed.proj.weight (timm) or embeddings.patch_embeddings.projection.weight "
                             "(HuggingFace ViT)")
    if fmt == "huggingface":
        prefix = _hf_prefix(state_dict)
        if prefix is None:
            raise ValueError("no embeddings.patch_embeddings.projection.weight: not a HuggingFace ViT state_dict")
        state_dict, fmt = _from_huggingface(state_dict, prefix), "timm"
    rules, patch = {"torchvision": (_TV, "conv_proj"), "timm": (_TIMM, "patch_embed.proj")}[fmt]
    own = model.state_dict()
    new, unused = {}, []
    for key, value in state_dict.items():
        for pat, rep in rules:
            if re.match(pat, key):
                target = re.sub(pat, rep, key)
                break
        else:
            if not key.startswith(patch + "."):
                unused.append(key)
            continue
        if target not in own:
            unused.append(key)
            continue
        if own[target].shape != value.shape:
            raise ValueError(f"{key} has shape {tuple(value.shape)} but {target} has {tuple(own[target].shape)}")
        new[target] = value
    w2d, b2d = state_dict[patch + ".weight"], state_dict.get(patch + ".bias")
    tok = model.tokenizer
    if w2d.shape[0] != model.dim:
        raise ValueError(f"patch kernel has {w2d.shape[0]} channels, model dim is {model.dim}")
    if tok.kernels == "per_tube":
        for i, (t, proj) in enumerate(zip(tok.tubes, tok.projs)):
            w = inflate_kernel(w2d, t.kernel)[: proj.weight.shape[0]]
            new[f"tokenizer.projs.{i}.weight"] = w
            if proj.bias is not None and b2d is not None:
                new[f"tokenizer.projs.{i}.bias"] = b2d[: proj.weight.shape[0]]
    else:
        new["tokenizer.base_weight"] = inflate_kernel(w2d, tok.base_kernel)
        if tok.biases is not None and b2d is not None:
            for i in range(len(tok.tubes)):
                new[f"tokenizer.biases.{i}"] = b2d
    missing = [k for k in own if k.startswith("blocks.") and k not in new and "gate_alpha" not in k]
    if missing:
        raise ValueError(f"the state_dict has no weights for {missing[:4]}... (depth or naming mismatch)")
    unknown = [k for k in unused if not _KNOWN_UNUSED.search(k)]
    if strict and unknown:
        raise ValueError(f"keys of the {fmt} state_dict that map to nothing in TubeViT: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''} (strict=False returns them with the unused keys)")
    model.load_state_dict(new, strict=False)
    return unused
