"""Video and image files in, uint8 tensors out, through PyAV (FFmpeg; ``pip install av``, or
``pip install tubevit_ext[video]``). Any container and codec the bundled FFmpeg reads: mp4/h264,
avi/mjpeg/mpeg4, webm/vp9, mkv, mpg/mpeg-1/2, mov; images (jpg, png, bmp) too.

Frames are numbered from 0 in presentation order; frame i of a constant-rate stream is the one
presented at ``start + i / fps``. Reading a set of frames seeks (to the keyframe at or before
the first one wanted, then decodes forward) instead of decoding from the start, and seeks again
across long gaps.

Errors name the file: a missing file raises FileNotFoundError, an unreadable or corrupt one
``VideoDecodeError`` (a ValueError), a frame index past the end IndexError.
"""
from __future__ import annotations

import os
from fractions import Fraction
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

# Seek again rather than decode forward when the next wanted frame is this many frames ahead.
_SEEK_GAP = 48


class VideoDecodeError(ValueError):
    """A file that is not a readable video (or image), named in the message."""


def _av():
    try:
        import av
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("reading video files needs PyAV: pip install av (or pip install tubevit_ext[video])") from None
    return av


def _open(path: str):
    av = _av()
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such video file: {path}")
    try:
        container = av.open(path)
    except Exception as e:  # FFmpeg's errors come in many types
        raise VideoDecodeError(f"{path}: not a readable video ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: has no video stream")
    return container


class VideoInfo(NamedTuple):
    path: str
    fps: float          # frames per second (the stream's average rate)
    num_frames: int     # decodable frames (counted from the packets when the header does not say)
    duration: float     # seconds: num_frames / fps
    width: int
    height: int
    codec: str


def _fps(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else Fraction(25)


def _frame_index(frame, start_pts: int, time_base: Fraction, fps: Fraction) -> int:
    if frame.pts is None:
        return -1
    return int(round((frame.pts - start_pts) * time_base * fps))


def _errors():
    av = _av()
    return (av.error.FFmpegError, av.error.InvalidDataError) if hasattr(av, "error") else (OSError,)


def probe(path: str) -> VideoInfo:
    """fps, frame count, duration and frame size of a video file, without decoding it (a file
    whose header has no frame count is demuxed, not decoded, to count its packets)."""
    container = _open(path)
    try:
        s = container.streams.video[0]
        fps = _fps(s)
        n = s.frames
        if not n:
            n = sum(1 for p in container.demux(s) if p.size)
        if n <= 0:
            raise VideoDecodeError(f"{path}: the video stream has no frames")
        return VideoInfo(path, float(fps), int(n), float(n / fps), s.codec_context.width, s.codec_context.height,
                         s.codec_context.name)
    except _errors() as e:
        raise VideoDecodeError(f"{path}: cannot read the stream ({type(e).__name__}: {e})") from None
    finally:
        container.close()


def read_frames(path: str, indices: Sequence[int]) -> torch.Tensor:
    """Frames ``indices`` (any order, repeats allowed) of a video as a uint8 tensor
    (len(indices), H, W, 3), RGB, in the order asked. An index the stream skips (variable frame
    rate) gets the frame presented just before it."""
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"{path}: indices must name at least one frame")
    if min(indices) < 0:
        raise IndexError(f"{path}: frame index {min(indices)} is negative")
    wanted = sorted(set(indices))
    got = {}
    container = _open(path)
    try:
        s = container.streams.video[0]
        s.thread_type = "AUTO"
        fps, tb = _fps(s), Fraction(s.time_base)
        start_pts = s.start_time or 0
        k = 0
        while k < len(wanted):
            # to the keyframe at or before the next wanted frame, then decode forward
            container.seek(start_pts + int(wanted[k] / fps / tb), stream=s, backward=True, any_frame=False)
            prev, last = None, -1
            for frame in container.decode(s):
                i = last = _frame_index(frame, start_pts, tb, fps)
                while k < len(wanted) and wanted[k] <= i:
                    src = frame if wanted[k] == i or prev is None else prev
                    got[wanted[k]] = src.to_ndarray(format="rgb24")
                    k += 1
                prev = frame
                if k == len(wanted) or wanted[k] - i > _SEEK_GAP:
                    break
            else:
                if k < len(wanted):
                    raise IndexError(f"{path}: frame {wanted[k]} is past the end of the video "
                                     f"(its last frame is {last})")
    except _errors() as e:
        raise VideoDecodeError(f"{path}: decoding failed ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    return torch.from_numpy(np.stack([got[i] for i in indices]))


def read_video(path: str, start_frame: int = 0, end_frame: Optional[int] = None) -> torch.Tensor:
    """Frames [start_frame, end_frame) (default: to the end) as uint8 (T, H, W, 3)."""
    if end_frame is None:
        end_frame = probe(path).num_frames
    return read_frames(path, range(start_frame, end_frame))


def read_clip_at(path: str, start_time: float, num_frames: int, stride: int = 1) -> torch.Tensor:
    """num_frames frames, every stride-th, from the one presented at start_time (seconds)."""
    fps = probe(path).fps
    first = int(round(start_time * fps))
    return read_frames(path, [first + j * stride for j in range(num_frames)])


def read_image(path: str) -> torch.Tensor:
    """An image file (jpg, png, bmp, ...) as uint8 (H, W, 3), RGB: its first frame."""
    container = _open(path)
    try:
        for frame in container.decode(container.streams.video[0]):
            return torch.from_numpy(frame.to_ndarray(format="rgb24"))
        raise VideoDecodeError(f"{path}: no image in the file")
    except _errors() as e:
        raise VideoDecodeError(f"{path}: decoding failed ({type(e).__name__}: {e})") from None
    finally:
        container.close()


def write_video(path: str, frames: torch.Tensor, fps: int = 25, codec: Optional[str] = None) -> None:
    """uint8 frames (T, H, W, 3) RGB to a video file; the codec defaults by extension (mp4/mkv:
    h264, avi: mpeg4, webm: vp9, mpg: mpeg1video). Used by the tests and the demo data."""
    av = _av()
    ext = os.path.splitext(path)[1].lower()
    codec = codec or {".mp4": "libx264", ".mkv": "libx264", ".avi": "mpeg4", ".webm": "libvpx-vp9",
                      ".mpg": "mpeg1video", ".mov": "libx264"}.get(ext, "mpeg4")
    frames = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    with av.open(path, "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1], frames.shape[2]
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec in ("libx264", "libvpx-vp9"):
            s.options = {"crf": "10"} if codec == "libx264" else {"crf": "10", "b": "0"}
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)


def write_image(path: str, image: torch.Tensor) -> None:
    """uint8 (H, W, 3) RGB to an image file (png, jpg by extension)."""
    av = _av()
    ext = os.path.splitext(path)[1].lower()
    codec, pix = {".png": ("png", "rgb24"), ".jpg": ("mjpeg", "yuvj444p"), ".jpeg": ("mjpeg", "yuvj444p"),
                  ".bmp": ("bmp", "bgr24")}.get(ext, (None, None))
    if codec is None:
        raise ValueError(f"{path}: write_image writes .png, .jpg or .bmp")
    img = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    with av.open(path, "w", format="image2") as out:
        s = out.add_stream(codec, rate=1)
        s.height, s.width, s.pix_fmt = img.shape[0], img.shape[1], pix
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        for packet in s.encode(frame):
            out.mux(packet)
        for packet in s.encode():
            out.mux(packet)


__all__ = ["VideoInfo", "VideoDecodeError", "probe", "read_frames", "read_video", "read_clip_at", "read_image",
           "write_video", "write_image"]
