"""Clip sampling and transforms on (C, T, H, W) clips (images: (C, H, W)).

Sampling returns frame indices, so a clip is decoded, not a whole video:
- ``clip_indices(num_frames, frames, step, start)``: ``frames`` indices ``start + j * step``;
  ``step`` is a frame stride (int) or ``fps / target_fps`` (a float: indices are rounded).
- ``random_clip`` (training) and ``uniform_clips`` (evaluation: N clips with evenly spaced
  starts, the first at 0 and the last ending at the last frame).
- A video shorter than a clip's span: ``short="clamp"`` (default) repeats the last frame;
  ``short="loop"`` wraps around to the start; ``short="error"`` raises ValueError naming the
  video's length and the clip's span.

Transforms: ``resize_short_side`` (bilinear with antialiasing), ``center_crop``, ``random_crop``,
``hflip``, ``normalize`` (uint8 -> float in [0, 1], then (x - mean) / std with a named preset:
``imagenet`` — the default, since weights start from image ViTs — ``clip``, ``inception``
(maps to [-1, 1]) or ``none``). ``ClipTransform`` chains them for training or evaluation.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

NORMALIZE = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
SHORT = ("clamp", "loop", "error")


def frame_step(stride: int = 1, fps: Optional[float] = None, target_fps: Optional[float] = None) -> float:
    """The distance between a clip's frames: ``stride``, or ``fps / target_fps`` when a target
    rate is given (e.g. 30 fps video sampled at 10 fps: every 3rd frame)."""
    if target_fps is not None:
        if fps is None or fps <= 0 or target_fps <= 0:
            raise ValueError(f"target_fps={target_fps} needs the video's fps (got {fps})")
        return fps / target_fps
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    return int(stride)


def clip_span(frames: int, step: float) -> int:
    """Frames a clip covers from its first index to its last, inclusive."""
    return int(round((frames - 1) * step)) + 1


def clip_indices(num_frames: int, frames: int, step: float = 1, start: int = 0, short: str = "clamp") -> List[int]:
    """``frames`` indices from ``start`` every ``step`` frames, kept inside [0, num_frames)
    as ``short`` says (see the module doc)."""
    if short not in SHORT:
        raise ValueError(f"short must be one of {SHORT}, got {short!r}")
    if num_frames < 1:
        raise ValueError(f"the video has no frames (num_frames={num_frames})")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    idx = [start + int(round(j * step)) for j in range(frames)]
    if idx[-1] >= num_frames:
        if short == "error":
            raise ValueError(f"a clip of {frames} frames every {step:g} spans {clip_span(frames, step)} frames; "
                             f"the video has {num_frames} (from frame {start})")
        idx = [i % num_frames for i in idx] if short == "loop" else [min(i, num_frames - 1) for i in idx]
    return idx


def random_clip(num_frames: int, frames: int, step: float = 1, generator: Optional[torch.Generator] = None,
                short: str = "clamp", lo: int = 0, hi: Optional[int] = None) -> List[int]:
    """A clip starting at a uniformly random frame such that it fits in [lo, hi) (default: the
    whole video); a range shorter than the clip starts at lo."""
    hi = num_frames if hi is None else hi
    last_start = hi - clip_span(frames, step)
    start = lo if last_start <= lo else lo + int(torch.randint(0, last_start - lo + 1, (1,), generator=generator))
    return clip_indices(num_frames, frames, step, start, short)


def uniform_clips(num_frames: int, frames: int, step: float = 1, n: int = 1, short: str = "clamp") -> List[List[int]]:
    """n clips with evenly spaced starts (one clip: centred)."""
    last_start = max(0, num_frames - clip_span(frames, step))
    if n == 1:
        starts = [last_start // 2]
    else:
        starts = [int(round(k * last_start / (n - 1))) for k in range(n)]
    return [clip_indices(num_frames, frames, step, s, short) for s in starts]


# ---------------------------------------------------------------- spatial transforms
def to_cthw(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames (T, H, W, 3) uint8 -> (3, T, H, W); an image (H, W, 3) -> (3, H, W)."""
    return frames.permute(3, 0, 1, 2) if frames.dim() == 4 else frames.permute(2, 0, 1)


def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, T, H, W) or (C, H, W), any dtype: the shorter of H, W becomes ``size`` (aspect kept),
    bilinear with antialiasing. uint8 on the CPU stays uint8: PyTorch's uint8 kernel on
    channels-last frames (the layout decoded (T, H, W, 3) frames have) is within one level of
    the float path's rounded result and ~100x faster than it on a 320x240 -> 341x256 clip (8 ms
    against 790 ms for 32 frames on one core of the 2-vCPU VM)."""
    H, W = x.shape[-2:]
    if min(H, W) == size:
        return x
    scale = size / min(H, W)
    hw = (max(size, int(round(H * scale))), max(size, int(round(W * scale))))
    image = x.dim() == 3
    y = x[:, None] if image else x
    y = y.permute(1, 0, 2, 3)  # (T, C, H, W): frames as the batch
    if x.dtype == torch.uint8 and x.device.type == "cpu":
        out = F.interpolate(y.contiguous(memory_format=torch.channels_last), size=hw, mode="bilinear",
                            align_corners=False, antialias=True)
    else:
        out = F.interpolate(y.float(), size=hw, mode="bilinear", align_corners=False, antialias=True)
        if x.dtype == torch.uint8:
            out = out.round_().clamp_(0, 255).to(torch.uint8)
    out = out.permute(1, 0, 2, 3)
    return out[:, 0] if image else out


def _crop(x: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return x[..., top:top + size, left:left + size]


def _check_crop(x, size):
    H, W = x.shape[-2:]
    if H < size or W < size:
        raise ValueError(f"cannot crop {size}x{size} from a {H}x{W} frame: resize the short side to >= {size} first")


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    _check_crop(x, size)
    H, W = x.shape[-2:]
    return _crop(x, (H - size) // 2, (W - size) // 2, size)


def random_crop(x: torch.Tensor, size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    _check_crop(x, size)
    H, W = x.shape[-2:]
    top = int(torch.randint(0, H - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, W - size + 1, (1,), generator=generator))
    return _crop(x, top, left, size)


def three_crops(x: torch.Tensor, size: int) -> List[torch.Tensor]:
    """Crops along the long side: its start, centre and end (the usual 3-crop evaluation)."""
    _check_crop(x, size)
    H, W = x.shape[-2:]
    if W >= H:
        return [_crop(x, (H - size) // 2, left, size) for left in (0, (W - size) // 2, W - size)]
    return [_crop(x, top, (W - size) // 2, size) for top in (0, (H - size) // 2, H - size)]


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def normalize(x: torch.Tensor, preset: Union[str, Sequence] = "imagenet") -> torch.Tensor:
    """uint8 (or float in [0, 1]) (C, ...) -> float32 (x - mean) / std per channel, contiguous;
    ``preset`` a name of NORMALIZE or a (mean, std) pair. As x * (1 / (255 std)) - mean / std in
    place on one fp32 copy (within an fp32 rounding of the written formula; 4.3 ms against 25 ms
    for a 32 x 224 x 224 clip on one core of the 2-vCPU VM)."""
    if isinstance(preset, str):
        if preset not in NORMALIZE:
            raise ValueError(f"normalize preset must be one of {sorted(NORMALIZE)} or (mean, std), got {preset!r}")
        preset = NORMALIZE[preset]
    mean, std = (torch.tensor(v, dtype=torch.float32, device=x.device) for v in preset)
    shape = (-1,) + (1,) * (x.dim() - 1)
    scale = (1.0 / std) / (255.0 if x.dtype == torch.uint8 else 1.0)
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    y.copy_(x)
    return y.mul_(scale.view(shape)).sub_((mean / std).view(shape))


class ClipAugment:
    """RandAugment (N ops of magnitude M) and random erasing applied identically to every frame of a
    (C, T, H, W) uint8 clip: torchvision.transforms.v2 on a ``tv_tensors.Video`` draws one set of
    parameters per clip (torchvision is an optional dependency, imported here). The parameters
    come from the sample's generator, so an epoch's augmentations do not depend on the worker
    layout. A class, not a closure, so datasets holding one pickle into spawned workers."""

    def __init__(self, randaugment: Optional[Sequence[int]] = None, random_erase: float = 0.0):
        try:
            from torchvision.transforms import v2
        except ImportError:
            raise ImportError("--randaugment / --random-erase need torchvision (its transforms.v2)") from None
        ops = []
        if randaugment:
            n, m = randaugment
            ops.append(v2.RandAugment(num_ops=int(n), magnitude=int(m)))
        if random_erase:
            ops.append(v2.RandomErasing(p=float(random_erase), value=0))
        self.tf = v2.Compose(ops)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        from torchvision import tv_tensors
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            y = self.tf(tv_tensors.Video(x.transpose(0, 1)))  # (T, C, H, W): frames share the parameters
        return y.as_subclass(torch.Tensor).transpose(0, 1)


def clip_augment(randaugment: Optional[Sequence[int]] = None, random_erase: float = 0.0):
    """A ClipAugment, or None when both are off."""
    return ClipAugment(randaugment, random_erase) if randaugment or random_erase else None


class ClipTransform:
    """Decoded frames (T, H, W, 3) uint8 (or an image (H, W, 3)) -> normalised float (C, T, S, S).

    train=True: resize the short side to ``resize`` (default 8/7 of ``size``), random crop,
    random horizontal flip (``flip``). train=False: resize, then one centre crop, or ``crops=3``
    crops along the long side (returned stacked: (crops, C, T, S, S)). Everything before the
    normalisation stays uint8. ``output="uint8"`` stops there: uint8 clips, dense in the decoded
    frames' (T, H, W, C) order (a crop copied row by row: 0.6 ms for 32 x 224 x 224 against 3.8 ms
    for a (C, T, H, W)-contiguous copy), a quarter of the bytes to hand to the training device,
    which normalises them with ``normalize``."""

    def __init__(self, size: int, train: bool, resize: Optional[int] = None, flip: bool = True,
                 crops: int = 1, normalize: Union[str, Sequence] = "imagenet", output: str = "float",
                 augment=None):
        if crops not in (1, 3):
            raise ValueError(f"crops must be 1 or 3, got {crops}")
        if isinstance(normalize, str) and normalize not in NORMALIZE:
            raise ValueError(f"normalize preset must be one of {sorted(NORMALIZE)} or (mean, std), got {normalize!r}")
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        self.size, self.train, self.flip, self.crops, self.norm = size, train, flip, crops, normalize
        self.resize = resize or int(math.ceil(size * 8 / 7))
        self.output = output
        self.augment = augment  # train only: clip_augment(...), on the uint8 crop

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "uint8":
            return x.movedim(0, -1).contiguous().movedim(-1, 0)
        return normalize(x, self.norm)

    def __call__(self, frames: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = resize_short_side(to_cthw(frames), self.resize)
        if self.train:
            x = random_crop(x, self.size, generator)
            if self.flip and bool(torch.rand((), generator=generator) < 0.5):
                x = hflip(x)
            if self.augment is not None:
                x = self.augment(x, generator)
            return self._finish(x)
        if self.crops == 1:
            return self._finish(center_crop(x, self.size))
        return torch.stack([self._finish(c) for c in three_crops(x, self.size)])


__all__ = ["ClipAugment", "clip_augment", "NORMALIZE", "frame_step", "clip_span", "clip_indices", "random_clip", "uniform_clips", "to_cthw",
           "resize_short_side", "center_crop", "random_crop", "three_crops", "hflip", "normalize", "ClipTransform"]
