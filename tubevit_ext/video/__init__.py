"""Video files in: decoding (PyAV), clip sampling and transforms, folder datasets.

Needs PyAV (``pip install av``, or ``pip install tubevit_ext[video]``); the op library itself
depends on torch and numpy only, and importing ``tubevit_ext`` does not import this package.
"""
from . import io, transforms  # noqa: F401
from .datasets import ImageFolder, JointLoader, VideoFolder, find_classes, seed_worker  # noqa: F401
from .io import VideoDecodeError, VideoInfo, probe, read_clip_at, read_frames, read_image, read_video, write_image, write_video  # noqa: F401

__all__ = ["io", "transforms", "VideoFolder", "ImageFolder", "JointLoader", "find_classes", "seed_worker",
           "VideoDecodeError", "VideoInfo", "probe", "read_frames", "read_video", "read_clip_at", "read_image",
           "write_video", "write_image"]
