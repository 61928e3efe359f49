"""Save a TubeViT with its configuration, load it back without code.

A directory holds ``config.json`` — the constructor's arguments (``TubeViT.config``), the
image-to-video scaling layer if enabled, a format tag — and the weights: ``model.safetensors``
when the safetensors package is installed (``pip install safetensors``; no pickle, memory-mapped
loading), else ``model.pt`` (``torch.save`` of the state_dict, loaded with ``weights_only=True``).
Loading builds the model from the configuration and refuses weights that do not match it,
naming the first parameter that differs.
"""
from __future__ import annotations

import json
import os

import torch

FORMAT = "tubevit_ext-pretrained-1"


def _safetensors():
    try:
        import safetensors.torch as st
        return st
    except ImportError:
        return None


def save_pretrained(model, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    config = dict(format=FORMAT, config=model.config, scaling_layer=model.scaling_layer)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    st = _safetensors()
    if st is not None:
        st.save_file(sd, os.path.join(directory, "model.safetensors"))
    else:
        torch.save(sd, os.path.join(directory, "model.pt"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def current_config(cfg: dict) -> dict:
    """A ``TubeViT.config`` in the current vocabulary: configurations saved before the attention
    heads were named ``num_heads`` (timm's name) say ``heads``."""
    cfg = dict(cfg)
    if "heads" in cfg and "num_heads" not in cfg:
        cfg["num_heads"] = cfg.pop("heads")
    return cfg


def model_from_config(cfg: dict):
    """A freshly initialised TubeViT from ``TubeViT.config`` (its JSON form included)."""
    from ..geometry import Tube
    from .tubevit import TubeViT
    kw = current_config(cfg)
    kw["tubes"] = [Tube(*t) for t in cfg["tubes"]]
    if cfg.get("space_to_depth") is not None:
        kw["space_to_depth"] = {int(k): tuple(v) for k, v in cfg["space_to_depth"].items()}
    return TubeViT(**kw)


def from_pretrained(directory: str, map_location="cpu"):
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no config.json (not a save_pretrained directory)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = model_from_config(meta["config"])
    if meta.get("scaling_layer") is not None:
        model.enable_image_to_video_scaling(meta["scaling_layer"])
    st_path, pt_path = os.path.join(directory, "model.safetensors"), os.path.join(directory, "model.pt")
    if os.path.exists(st_path):
        st = _safetensors()
        if st is None:
            raise ImportError(f"{st_path} needs the safetensors package: pip install safetensors")
        sd = st.load_file(st_path, device=str(map_location))
    elif os.path.exists(pt_path):
        sd = torch.load(pt_path, map_location=map_location, weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} has no model.safetensors or model.pt")
    own = model.state_dict()
    for k in own:
        if k not in sd:
            raise ValueError(f"{directory}: the weights have no {k!r}, which config.json's model has")
        if sd[k].shape != own[k].shape:
            raise ValueError(f"{directory}: {k} has shape {tuple(sd[k].shape)} in the weights but "
                             f"{tuple(own[k].shape)} in the model config.json describes")
    extra = sorted(set(sd) - set(own))
    if extra:
        raise ValueError(f"{directory}: the weights hold {extra[:4]}, which config.json's model has not")
    model.load_state_dict(sd)
    return model
