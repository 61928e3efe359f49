"""Folder datasets for training on video files (and images, for joint training).

Layout: one sub-folder per class (UCF101 / HMDB / Kinetics style), ``classes`` sorted by name,
``class_to_idx``. Splits, in this order of precedence:
- ``split_file``: a UCF101-style list ("Class/file.avi [label]" per line, relative to the root;
  labels, when given, are 1-based as in UCF101's trainlist files and must agree with the folder);
- ``root/train`` and ``root/val`` sub-trees with the same class folders;
- otherwise a deterministic split: a file is in "val" when a hash of its path relative to the
  class folder (stable across machines and Python runs) falls below ``val_fraction``.

Building a dataset lists files and nothing more: a file is probed (frame count and rate, from its
packets: ``io._frame_table``) the first time a worker loads it, and kept per process. Unreadable
files: ``on_error="skip"`` (default) replaces a file that cannot be read by the next readable
sample, with a warning naming it; ``on_error="raise"`` raises, naming the file. Short videos follow ``short`` (see
``transforms``). Clips are drawn with a per-sample generator seeded from (seed, epoch, index),
so an epoch is the same in every worker layout; ``seed_worker`` seeds the other libraries.
"""
from __future__ import annotations

import hashlib
import os
import random
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from . import io as vio
from .transforms import ClipTransform, frame_step, random_clip, uniform_clips

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ON_ERROR = ("skip", "raise")


def find_classes(root: str) -> Tuple[List[str], Dict[str, int]]:
    """Class names (sorted sub-folder names of root) and their indices."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such data folder: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected ROOT/<class>/<file>, "
                         "or ROOT/train/<class>/... and ROOT/val/<class>/...)")
    return classes, {c: i for i, c in enumerate(classes)}


def _files(folder: str, exts) -> List[str]:
    out = []
    for dirpath, _, names in os.walk(folder):
        out += [os.path.join(dirpath, n) for n in names if n.lower().endswith(exts)]
    return sorted(out)


def _in_val(rel: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big")
    return h / 2 ** 64 < val_fraction


def folder_samples(root: str, split: str, exts, val_fraction: float = 0.2,
                   split_file: Optional[str] = None) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(path, class index) pairs of one split, and the class names (see the module doc)."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    sub = os.path.join(root, split)
    if split_file is None and split != "all" and os.path.isdir(os.path.join(root, "train")):
        classes, idx = find_classes(sub)
        samples = [(f, idx[c]) for c in classes for f in _files(os.path.join(sub, c), exts)]
        return samples, classes
    classes, idx = find_classes(root)
    if split_file is not None:
        samples = []
        with open(split_file) as fh:
            for n, line in enumerate(fh, 1):
                parts = line.split()
                if not parts:
                    continue
                rel = parts[0]
                cls = rel.replace("\\", "/").split("/")[0]
                if cls not in idx:
                    raise ValueError(f"{split_file}:{n}: class folder {cls!r} of {rel!r} is not in {root}")
                if len(parts) > 1 and int(parts[1]) - 1 != idx[cls]:
                    raise ValueError(f"{split_file}:{n}: label {parts[1]} of {rel!r} does not match its folder "
                                     f"({cls!r} is class {idx[cls] + 1} of the sorted folders)")
                samples.append((os.path.join(root, rel), idx[cls]))
        return samples, classes
    samples = []
    for c in classes:
        for f in _files(os.path.join(root, c), exts):
            if split == "all" or _in_val(os.path.relpath(f, os.path.join(root, c)), val_fraction) == (split == "val"):
                samples.append((f, idx[c]))
    return samples, classes


def _skip_message(path: str, e: Exception) -> str:
    msg = str(e)
    return f"skipping {path}: " + (msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg)


class _Folder(Dataset):
    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index)

    def set_epoch(self, epoch: int) -> None:
        """Clips and crops of the next epoch (call before each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for k in range(len(self.samples)):
            i = (index + k) % len(self.samples)
            path, label = self.samples[i]
            try:
                return self._load(path, self._generator(i)), label
            except (vio.VideoDecodeError, IndexError, FileNotFoundError) as e:
                if self.on_error == "raise":
                    raise
                warnings.warn(_skip_message(path, e))
        raise RuntimeError(f"no readable sample in {self.root}")


class VideoFolder(_Folder):
    """Clips of the videos under root: ``(clip, label)``, clip float (C, frames, size, size).

    train=True: one random clip per video per epoch, random crop and flip. train=False: ``clips``
    uniformly spaced clips x ``crops`` (1 or 3) crops, stacked: (clips * crops, C, T, S, S).
    Frames are ``stride`` apart, or sampled at ``target_fps``. ``flip=False`` for classes a
    mirror image changes (left vs right motion). ``output="uint8"``: clips stay uint8 (the
    consumer normalises them, ``transforms.normalize``, e.g. on the training device). ``augment``:
    ``transforms.clip_augment(...)``, applied to training clips."""

    def __init__(self, root: str, split: str = "train", frames: int = 8, size: int = 112, train: Optional[bool] = None,
                 stride: int = 1, target_fps: Optional[float] = None, clips: int = 1, crops: int = 1,
                 normalize="imagenet", short: str = "clamp", val_fraction: float = 0.2,
                 split_file: Optional[str] = None, on_error: str = "skip", seed: int = 0, flip: bool = True,
                 output: str = "float", augment=None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        frame_step(stride)  # validates stride
        self.root, self.frames, self.stride, self.target_fps = root, frames, stride, target_fps
        self.train = split == "train" if train is None else train
        self.clips, self.short, self.on_error, self.seed, self.epoch = clips, short, on_error, seed, 0
        self.transform = ClipTransform(size, self.train, flip=flip, crops=1 if self.train else crops,
                                       normalize=normalize, output=output, augment=augment)
        samples, self.classes = folder_samples(root, split, VIDEO_EXTENSIONS, val_fraction, split_file)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if not samples:
            raise ValueError(f"no video in split {split!r} of {root}")
        self.samples = samples
        self.infos: Dict[str, vio.VideoInfo] = {}  # probed on first load, per process

    def _load(self, path: str, g: torch.Generator) -> torch.Tensor:
        info = self.infos.get(path)
        if info is None:
            info = self.infos[path] = vio.probe(path)
        step = frame_step(self.stride, info.fps, self.target_fps)
        if self.train:
            return self.transform(vio.read_frames(path, random_clip(info.num_frames, self.frames, step, g,
                                                                    self.short)), g)
        # every clip from one read: one decode of the video, not one per clip
        clips = uniform_clips(info.num_frames, self.frames, step, self.clips, self.short)
        frames = vio.read_frames(path, [i for c in clips for i in c])
        outs = []
        for k in range(len(clips)):
            y = self.transform(frames[k * self.frames:(k + 1) * self.frames])
            outs.append(y if y.dim() == 5 else y[None])
        return torch.cat(outs)


class ImageFolder(_Folder):
    """Images under root: ``(image, label)``, image float (C, size, size); train=True random crop
    and flip, else a centre crop."""

    def __init__(self, root: str, split: str = "train", size: int = 112, train: Optional[bool] = None,
                 normalize="imagenet", val_fraction: float = 0.2, split_file: Optional[str] = None,
                 on_error: str = "skip", seed: int = 0):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.root, self.on_error, self.seed, self.epoch = root, on_error, seed, 0
        self.train = split == "train" if train is None else train
        self.transform = ClipTransform(size, self.train, normalize=normalize)
        self.samples, self.classes = folder_samples(root, split, IMAGE_EXTENSIONS, val_fraction, split_file)
        if not self.samples:
            raise ValueError(f"no image in split {split!r} of {root}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def _load(self, path: str, g: torch.Generator) -> torch.Tensor:
        return self.transform(vio.read_image(path), g)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy's and random's generators from torch's worker seed (which
    the DataLoader derives from its generator), so workers are reproducible."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def collate_samples(batch):
    """Keeps samples as a list (their shapes may differ: joint batches go to TubeViT.joint_loss)."""
    return [b[0] for b in batch], [b[1] for b in batch]


class JointLoader:
    """Mixed image + video batches for ``TubeViT.joint_loss``: each step yields
    ``(samples, heads, labels)`` with ``video_batch`` clips from the video loader and
    ``image_batch`` images from the image loader, one forward pass for all. An epoch is one pass
    over the videos; the image loader restarts as often as needed."""

    def __init__(self, videos: torch.utils.data.DataLoader, images: torch.utils.data.DataLoader,
                 video_head: str = "video", image_head: str = "image"):
        self.videos, self.images = videos, images
        self.video_head, self.image_head = video_head, image_head

    def __len__(self) -> int:
        return len(self.videos)

    def __iter__(self) -> Iterator:
        it = iter(self.images)
        for clips, vlabels in self.videos:
            try:
                imgs, ilabels = next(it)
            except StopIteration:
                it = iter(self.images)
                imgs, ilabels = next(it)
            clips, imgs = _as_list(clips), _as_list(imgs)
            yield (clips + imgs, [self.video_head] * len(clips) + [self.image_head] * len(imgs),
                   _as_list(vlabels) + _as_list(ilabels))


def _as_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return list(x.unbind(0)) if x.dim() > 1 else x.tolist()
    return list(x)


__all__ = ["VIDEO_EXTENSIONS", "IMAGE_EXTENSIONS", "find_classes", "folder_samples", "VideoFolder", "ImageFolder",
           "JointLoader", "seed_worker", "collate_samples"]
