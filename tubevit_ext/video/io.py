"""Video and image files in, uint8 tensors out, through PyAV (FFmpeg; ``pip install av``, or
``pip install tubevit_ext[video]``). Any container and codec the bundled FFmpeg reads: mp4/h264,
avi/mjpeg/mpeg4, webm/vp9, mkv, mpg/mpeg-1/2, mov; images (jpg, png, bmp) too.

Frames are numbered from 0 in presentation order: frame i is the i-th frame a sequential decode
presents, whatever the timestamps (a first timestamp other than 0, variable frame rate). A file's
frame table (every frame's presentation timestamp and which frames are keyframes, from its packets:
demuxed, not decoded) is read once per process and kept (``_frame_table``). Reading a set of
frames seeks to the keyframe at or before the first one wanted (not at all when that is the first
keyframe) and decodes forward; it seeks forward again only when a keyframe lies between the last
frame decoded and the next one wanted more than ``_SEEK_GAP`` frames on, so a clip costs one seek
and every seek moves forward or, when a seek lands past its frame, to an earlier keyframe: a read
ends.

Errors name the file: a missing file raises FileNotFoundError, an unreadable or corrupt one
``VideoDecodeError`` (a ValueError), a frame index past the end IndexError.
"""
from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from fractions import Fraction
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

# Seek forward rather than decode on when the next wanted frame is this many frames ahead (and a
# keyframe lies in between): decoding ~48 frames of 320x240 H.264 costs about what a seek does.
_SEEK_GAP = 48
# Frame tables kept per process, by (path, size, mtime): a file's packets are demuxed once.
_TABLE_CACHE_SIZE = 4096


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


def _errors():
    av = _av()
    return (av.error.FFmpegError, av.error.InvalidDataError) if hasattr(av, "error") else (OSError,)


def probe(path: str) -> VideoInfo:
    """fps, frame count, duration and frame size of a video file, without decoding it. The frame
    count is the frame table's (the frames read_frames numbers; the file's packets are demuxed
    once per process), the header's for a stream without timestamps."""
    container = _open(path)
    try:
        s = container.streams.video[0]
        fps = _fps(s)
        n = len(_frame_table(path).pts) or s.frames
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


class _FrameTable(NamedTuple):
    pts: List[int]        # presentation timestamp of frame i (stream time base), ascending
    index: Dict[int, int]  # pts -> frame index
    keyframes: List[int]  # indices of the keyframes, ascending (frame 0 first)


_tables: "OrderedDict[tuple, _FrameTable]" = OrderedDict()


def _frame_table(path: str) -> _FrameTable:
    """The frame table of ``path`` from its packets (demuxed, not decoded, in a container of its
    own, so a reader's stays at the start; kept per process). A packet without a pts counts at its
    dts; a stream with no timestamps at all gets an empty table, and its frames are then counted
    as they are decoded."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _tables:
        _tables.move_to_end(key)
        return _tables[key]
    stamps, keys = [], []
    container = _open(path)
    try:
        for p in container.demux(container.streams.video[0]):
            if not p.size:
                continue  # the demuxer's flush packet
            t = p.pts if p.pts is not None else p.dts
            if t is None:
                stamps = []
                break
            stamps.append(t)
            if p.is_keyframe:
                keys.append(t)
    finally:
        container.close()
    pts = sorted(set(stamps))
    index = {t: i for i, t in enumerate(pts)}
    keyframes = sorted({index[t] for t in keys} | ({0} if pts else set()))
    table = _FrameTable(pts, index, keyframes)
    _tables[key] = table
    if len(_tables) > _TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return table


def read_frames(path: str, indices: Sequence[int]) -> torch.Tensor:
    """Frames ``indices`` (any order, repeats allowed) of a video as a uint8 tensor
    (len(indices), H, W, 3), RGB, in the order asked; frame i is the i-th frame a sequential
    decode presents. One seek to the keyframe at or before the first wanted frame (none when it
    is the first keyframe), then a forward decode (see the module's docstring)."""
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
        table = _frame_table(path)
        if table.pts and wanted[-1] >= len(table.pts):
            raise IndexError(f"{path}: frame {wanted[-1]} is past the end of the video "
                             f"(its last frame is {len(table.pts) - 1})")
        k, last, overshot = 0, -1, set()  # overshot: keyframes whose seek landed past its frame
        key = _keyframe_at_or_before(table, wanted[0])
        fresh = True  # the container is at the start: frame 0 needs no seek
        while k < len(wanted):
            # to keyframe `key` (the first one: from the start), then decode forward
            if key > 0 or not fresh:
                container.seek(table.pts[key] if key > 0 else (s.start_time or 0), stream=s, backward=True,
                               any_frame=False)
            fresh = False
            first, prev, seek_again, pos = True, None, False, -1 if key == 0 else None
            for frame in container.decode(s):
                i = _index_of(table, frame, pos)
                if first and key > 0 and (i is None or i > wanted[k]):
                    # landed past the frame (or cannot tell where): from an earlier keyframe
                    overshot.add(key)
                    key = _keyframe_at_or_before(table, key - 1)
                    seek_again = True
                    break
                first = False
                pos = last = i
                while k < len(wanted) and wanted[k] <= i:
                    src = frame if wanted[k] == i or prev is None else prev
                    got[wanted[k]] = src.to_ndarray(format="rgb24")
                    k += 1
                prev = frame
                if k == len(wanted):
                    break
                nxt = _keyframe_at_or_before(table, wanted[k])
                if nxt > i + 1 and wanted[k] - i > _SEEK_GAP and nxt not in overshot:  # well ahead: jump
                    key, seek_again = nxt, True
                    break
            if first and key > 0 and not seek_again:  # the seek left nothing to decode: an earlier keyframe
                overshot.add(key)
                key, seek_again = _keyframe_at_or_before(table, key - 1), True
            if k < len(wanted) and not seek_again:
                raise IndexError(f"{path}: frame {wanted[k]} is past the end of the video "
                                 f"(its last frame is {last})")
    except _errors() as e:
        raise VideoDecodeError(f"{path}: decoding failed ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    return torch.from_numpy(np.stack([got[i] for i in indices]))


def _keyframe_at_or_before(table: _FrameTable, i: int) -> int:
    """The last keyframe index <= i (0 without a table)."""
    if not table.keyframes:
        return 0
    return table.keyframes[max(bisect.bisect_right(table.keyframes, i) - 1, 0)]


def _index_of(table: _FrameTable, frame, before: Optional[int]) -> Optional[int]:
    """A decoded frame's index: its pts in the table; a pts between two of the table's, the frame
    presented at or before it; no pts, the frame after ``before`` (the index of the frame decoded
    before it; None where that is unknown: the first frame after a seek)."""
    t = frame.pts
    if t is not None and table.pts:
        i = table.index.get(t)
        return i if i is not None else max(bisect.bisect_right(table.pts, t) - 1, 0)
    return None if before is None else before + 1


def read_video(path: str, start_frame: int = 0, end_frame: Optional[int] = None) -> torch.Tensor:
    """Frames [start_frame, end_frame) (default: to the end) as uint8 (T, H, W, 3)."""
    if end_frame is None:
        end_frame = probe(path).num_frames
    return read_frames(path, range(start_frame, end_frame))


def read_clip_at(path: str, start_time: float, num_frames: int, stride: int = 1) -> torch.Tensor:
    """num_frames frames, every stride-th, from the one presented at start_time (seconds after the
    stream's first frame)."""
    container = _open(path)
    try:
        s = container.streams.video[0]
        table = _frame_table(path)
        if table.pts:
            at = table.pts[0] + start_time / Fraction(s.time_base)
            first = max(bisect.bisect_right(table.pts, at + Fraction(1, 10**6) / Fraction(s.time_base)) - 1, 0)
        else:
            first = int(round(start_time * _fps(s)))
    finally:
        container.close()
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
