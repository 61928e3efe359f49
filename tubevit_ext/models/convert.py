"""Initialise a TubeViT from an image ViT state_dict (torchvision, timm, HuggingFace ViT, or a
CLIP vision tower: HuggingFace CLIP, OpenCLIP / OpenAI CLIP).

Mapping (no download: the caller brings the state_dict):
* encoder blocks map one to one (torchvision ``encoder.layers.encoder_layer_i.*``,
  timm ``blocks.i.*``, HuggingFace ViT ``[vit.]encoder.layer.i.*`` (the google/vit-*
  checkpoints) or ``[vit.]layers.i.*`` (transformers 5) -> ``blocks.i.*``; torchvision's
  ``in_proj`` is q,k,v stacked like timm's ``qkv``, HuggingFace's separate q, k, v are
  stacked the same way), final norm -> ``norm``; CLIP towers (HuggingFace ``[vision_model.]``
  ``encoder.layers.i.*``, OpenCLIP ``[visual.]transformer.resblocks.i.*``) the same way, their
  pre-block norm (``pre_layrnorm`` / ``ln_pre``) -> ``norm_pre`` (build the TubeViT with
  ``pre_norm=True``) and the norm after the blocks (``post_layernorm`` / ``ln_post``) ->
  ``norm``. CLIP's blocks use LayerNorm eps 1e-5 and, for OpenAI's weights and OpenCLIP's
  ``*-quickgelu`` models, QuickGELU: build the TubeViT with ``eps=1e-5`` and
  ``act="quick_gelu"`` to match (a state_dict does not record either);
* the 16x16 patch kernel becomes the image (2D) tube's kernel, exactly;
* 3D tube kernels are inflated from it: resized to (kh, kw) (area averaging when
  shrinking, bilinear when growing) and scaled by 16*16/(kh*kw) (so a constant patch gives the same response),
  repeated over kt frames and divided by kt (so a static video gives the same
  response as its frame: I3D-style inflation). Biases copy the patch bias (zeros where the
  patch embedding has none, as in CLIP).
  Space-to-depth tubes (d/S channels) take the first d/S output channels.
* not used: the class token, the learned position embedding (TubeViT uses
  the fixed sin/cos one), the classification head or CLIP's projection (the readout differs)
  and a CLIP model's text tower; they are returned so the caller can see what was left out.
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
_TIMM = [(r"^blocks\.(\d+)\.", r"blocks.\1."), (r"^norm\.", "norm."), (r"^norm_pre\.", "norm_pre.")]


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
    _stack_qkv(qkv, out)
    return out


def _stack_qkv(qkv, out):
    """out["blocks.i.attn.qkv.{weight,bias}"] = q, k, v stacked, from qkv[(i, kind)] = {"q": ..,
    "k": .., "v": ..}; all three must be there."""
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"block {i}: the state_dict has {sorted(parts)} of q, k, v {kind}s, not all three")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])


# CLIP vision towers, relative to the tower's prefix -> timm layout. HuggingFace's CLIP
# (CLIPVisionModel: no prefix in transformers 5; CLIPModel: "vision_model.") and OpenCLIP's /
# OpenAI's (VisionTransformer: no prefix; CLIP: "visual."). Group 1 is the block index.
_HF_CLIP = [(r"embeddings\.patch_embedding\.", "patch_embed.proj."), (r"pre_layrnorm\.", "norm_pre."),
            (r"post_layernorm\.", "norm."),
            (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
            (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
            (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
            (r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2.")]
_HF_CLIP_QKV = r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$"
_OPEN_CLIP = [(r"conv1\.", "patch_embed.proj."), (r"ln_pre\.", "norm_pre."), (r"ln_post\.", "norm."),
              (r"transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
              (r"transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
              (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
              (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
              (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
              (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2.")]
# what a CLIP tower has that TubeViT does not use (besides the text tower, outside the prefix)
_CLIP_UNUSED = re.compile(r"^(embeddings\.class_embedding|embeddings\.position_embedding\.|embeddings\.position_ids|"
                          r"class_embedding|positional_embedding|proj)$|^embeddings\.position_embedding\.")


def _clip_prefix(state_dict, fmt):
    """The vision tower's key prefix of a CLIP state_dict of ``fmt`` ("clip": HuggingFace,
    "open_clip"), or None when the state_dict is not one."""
    anchor, probe = {"clip": ("embeddings.patch_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight"),
                     "open_clip": ("conv1.weight", "transformer.resblocks.0.attn.in_proj_weight")}[fmt]
    for k in state_dict:
        if k.endswith(anchor) and k[:-len(anchor)] + probe in state_dict:
            return k[:-len(anchor)]
    return None


def _from_clip(state_dict: Dict[str, torch.Tensor], fmt: str, prefix: str):
    """A CLIP vision tower's state_dict in timm's layout, and the keys known to be unused (the
    class and position embeddings, the projection, everything outside the tower: the text
    tower of a whole CLIP model). Tower keys it does not map keep their names."""
    rules = _HF_CLIP if fmt == "clip" else _OPEN_CLIP
    out, qkv, unused = {}, {}, []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            unused.append(key)
            continue
        rel = key[len(prefix):]
        if _CLIP_UNUSED.search(rel) or (fmt == "clip" and key == "visual_projection.weight"):
            unused.append(key)
            continue
        m = re.match(_HF_CLIP_QKV, rel) if fmt == "clip" else None
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pat, rep in rules:
            m = re.match(pat, rel)
            if m:
                out[m.expand(rep) + rel[m.end():]] = value
                break
        else:
            out[key] = value
    _stack_qkv(qkv, out)
    return out, unused


# Keys an image ViT has that TubeViT does not use: class token, learned position embedding,
# classification head(s), pre-logits; anything else unmapped is an error, listed.
_KNOWN_UNUSED = re.compile(r"(^|\.)(class_token|cls_token|pos_embed|pos_embedding|position_embeddings|"
                           r"heads?|classifier|pre_logits|fc_norm|reg_token|dist_token|head_dist|pooler)(\.|$)")


def load_image_vit(model: TubeViT, state_dict: Dict[str, torch.Tensor], fmt: str = "auto",
                   strict: bool = True) -> List[str]:
    """Copies an image ViT's weights into ``model``; returns the keys it did not use (class
    token, learned position embedding, classification head).

    fmt: "torchvision" (vit_b_16 & co), "timm" (vit_base_patch16_224 & co, the CLIP ones
    included), "huggingface" (transformers' ViTModel / ViTForImageClassification, google/vit-*),
    "clip" (transformers' CLIPVisionModel / CLIPModel, openai/clip-vit-*), "open_clip"
    (OpenCLIP's CLIP / VisionTransformer, and OpenAI's original CLIP checkpoints) or "auto".
    A tower with a norm before its blocks (CLIP) needs a TubeViT built with pre_norm=True; see
    the module doc for eps and act.
    strict: raise ValueError listing the keys that are neither mapped nor known to be unused
    (False: return them with the others).
    """
    formats = ("auto", "torchvision", "timm", "huggingface", "clip", "open_clip")
    if fmt not in formats:
        raise ValueError(f"fmt must be one of {', '.join(repr(f) for f in formats)}, got {fmt!r}")
    if fmt == "auto":
        fmt = ("torchvision" if "conv_proj.weight" in state_dict else
               "timm" if "patch_embed.proj.weight" in state_dict else
               "huggingface" if _hf_prefix(state_dict) is not None else
               "clip" if _clip_prefix(state_dict, "clip") is not None else
               "open_clip" if _clip_prefix(state_dict, "open_clip") is not None else None)
        if fmt is None:
            raise ValueError("cannot tell the state_dict format: no conv_proj.weight (torchvision), "
                             "patch_embed.proj.weight (timm), embeddings.patch_embeddings.projection.weight "
                             "(HuggingFace ViT), embeddings.patch_embedding.weight + encoder.layers.0.self_attn.* "
                             "(HuggingFace CLIP) or conv1.weight + transformer.resblocks.0.attn.* (OpenCLIP)")
    known_unused = []
    if fmt in ("clip", "open_clip"):
        prefix = _clip_prefix(state_dict, fmt)
        if prefix is None:
            raise ValueError(f"not a {'HuggingFace CLIP' if fmt == 'clip' else 'OpenCLIP'} vision tower: no "
                             + ("embeddings.patch_embedding.weight with encoder.layers.0.self_attn.q_proj.weight"
                                if fmt == "clip" else "conv1.weight with transformer.resblocks.0.attn.in_proj_weight"))
        state_dict, known_unused = _from_clip(state_dict, fmt, prefix)
        source, fmt = fmt, "timm"
    else:
        source = fmt
    if fmt == "huggingface":
        prefix = _hf_prefix(state_dict)
        if prefix is None:
            raise ValueError("no embeddings.patch_embeddings.projection.weight: not a HuggingFace ViT state_dict")
        state_dict, fmt = _from_huggingface(state_dict, prefix), "timm"
    if any(k.startswith("norm_pre.") for k in state_dict) and "norm_pre.weight" not in model.state_dict():
        raise ValueError(f"the {source} ViT normalises its tokens before the first block (norm_pre / ln_pre / "
                         "pre_layrnorm) and this TubeViT does not: build it with pre_norm=True (tubevit train: "
                         "--blocks clip or clip-quickgelu)")
    rules, patch = {"torchvision": (_TV, "conv_proj"), "timm": (_TIMM, "patch_embed.proj")}[fmt]
    own = model.state_dict()
    new, unused = {}, list(known_unused)
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
    if b2d is None:  # CLIP's patch embedding has no bias: the image tube then reproduces it exactly
        b2d = w2d.new_zeros(w2d.shape[0])
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
    missing = [k for k in own if k.startswith(("blocks.", "norm_pre.")) and k not in new and "gate_alpha" not in k]
    if missing:
        raise ValueError(f"the state_dict has no weights for {missing[:4]}... (depth or naming mismatch)")
    known = set(known_unused)
    unknown = [k for k in unused if k not in known and not _KNOWN_UNUSED.search(k)]
    if strict and unknown:
        raise ValueError(f"keys of the {source} state_dict that map to nothing in TubeViT: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''} (strict=False returns them with the unused keys)")
    model.load_state_dict(new, strict=False)
    return unused
