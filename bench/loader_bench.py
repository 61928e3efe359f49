"""What the video loader costs per worker: clips/s for the train and eval transforms on files
written at run time with the encoder's default settings, split into decode and transform, against
a plain PyAV decode of the same frames, decord (when installed) and the float32 transform the
loader had before (resize and normalise in fp32 at full frame size), all in one run.

    taskset -c 0 python bench/loader_bench.py [--videos 6] [--repeats 3] [--json out.json]

Files: "ucf" 320x240 at 25 fps, 7 s (UCF101-like); "kinetics" 426x320 (short side 320) at 30 fps,
10 s; H.264 by libx264 with no options (a keyframe every 250 frames, B-frames). Clips: 32 frames
at stride 2 -> 224x224 (train: resize the short side to 256, random crop and flip; eval: 4 clips
x 3 crops), normalised in the worker (float output) or left uint8 for the training device to
normalise (--normalize-on-device). One worker is one process on one core (pin it with taskset),
torch on one thread.
Also: building a VideoFolder over 10,000 files (listing only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tubevit_ext.video import VideoFolder  # noqa: E402
from tubevit_ext.video import io as vio  # noqa: E402
from tubevit_ext.video import transforms as T  # noqa: E402

SETS = {"ucf": dict(w=320, h=240, fps=25, seconds=7), "kinetics": dict(w=426, h=320, fps=30, seconds=10)}


def write_set(root, name, n, seed=0):
    """n videos of moving smooth noise (so the encoder predicts, as on camera footage), libx264 defaults."""
    import av
    cfg, rng = SETS[name], np.random.default_rng(seed)
    w, h = cfg["w"], cfg["h"]
    for v in range(n):
        path = os.path.join(root, name, f"c{v % 2}", f"v{v}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        small = rng.integers(0, 255, ((h + 64) // 4, (w + 64) // 4 + 1, 3), dtype=np.uint8)
        base = small.repeat(4, 0).repeat(4, 1)
        with av.open(path, "w") as out:
            s = out.add_stream("libx264", rate=cfg["fps"])
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            for i in range(cfg["fps"] * cfg["seconds"]):
                f = np.ascontiguousarray(base[(i // 3) % 64:(i // 3) % 64 + h, i % 64:i % 64 + w])
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)


def float32_transform(frames, size=224, resize=256, g=None):
    """The train transform as the loader had it: fp32 resize at full frame size, fp32 normalise."""
    x = T.to_cthw(frames)
    H, W = x.shape[-2:]
    s = resize / min(H, W)
    y = F.interpolate(x.permute(1, 0, 2, 3).float(), size=(max(resize, round(H * s)), max(resize, round(W * s))),
                      mode="bilinear", align_corners=False, antialias=True).round_().clamp_(0, 255)
    y = T.random_crop(y.to(torch.uint8).permute(1, 0, 2, 3), size, g)
    mean, std = (torch.tensor(v).view(-1, 1, 1, 1) for v in T.NORMALIZE["imagenet"])
    return (y.float() / 255 - mean) / std


def ms(fn, repeats):
    """Median milliseconds of `repeats` calls after one untimed call."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def bench_set(root, name, repeats):
    folder = os.path.join(root, name)
    train = VideoFolder(folder, "all", frames=32, size=224, stride=2, train=True)
    evals = VideoFolder(folder, "all", frames=32, size=224, stride=2, train=False, clips=4, crops=3)
    train8 = VideoFolder(folder, "all", frames=32, size=224, stride=2, train=True, output="uint8")
    evals8 = VideoFolder(folder, "all", frames=32, size=224, stride=2, train=False, clips=4, crops=3, output="uint8")
    tf8 = T.ClipTransform(224, True, output="uint8")
    tf = T.ClipTransform(224, True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, (path, _) in enumerate(train.samples):
        info = vio.probe(path)
        idx = T.random_clip(info.num_frames, 32, 2, torch.Generator().manual_seed(i))
        frames = vio.read_frames(path, idx)
        r = dict(file=os.path.basename(path), first_frame=idx[0])
        r["decode_ms"] = ms(lambda: vio.read_frames(path, idx), repeats)
        r["transform_ms"] = ms(lambda: tf(frames, g), repeats)
        r["float32_transform_ms"] = ms(lambda: float32_transform(frames, g=g), repeats)
        r["train_clip_ms"] = ms(lambda: train[i], repeats)
        r["eval_4x3_ms"] = ms(lambda: evals[i], repeats)
        r["uint8_transform_ms"] = ms(lambda: tf8(frames, g), repeats)
        r["uint8_train_clip_ms"] = ms(lambda: train8[i], repeats)
        r["uint8_eval_4x3_ms"] = ms(lambda: evals8[i], repeats)
        r["pyav_decode_ms"] = ms(lambda: plain_pyav(path, idx), repeats)
        try:
            import decord
            r["decord_ms"] = ms(lambda: decord.VideoReader(path, num_threads=1).get_batch(idx).asnumpy(), repeats)
        except ImportError:
            pass
        rows.append(r)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_ms")}
    med["train_clips_per_s"] = 1e3 / med["train_clip_ms"]
    med["before_clips_per_s"] = 1e3 / (med["decode_ms"] + med["float32_transform_ms"])
    med["transform_share"] = med["transform_ms"] / med["train_clip_ms"]
    med["eval_over_train"] = med["eval_4x3_ms"] / med["train_clip_ms"]
    med["uint8_transform_share"] = med["uint8_transform_ms"] / med["uint8_train_clip_ms"]
    med["uint8_eval_over_train"] = med["uint8_eval_4x3_ms"] / med["uint8_train_clip_ms"]
    return dict(set=name, **SETS[name], videos=len(rows), median=med, rows=rows)


def plain_pyav(path, idx):
    """The same frames by hand: seek to the keyframe at or before the first (its pts from the frame
    table), decode forward, keep the clip's frames as RGB arrays."""
    import av
    table, want, got = vio._frame_table(path), set(idx), []
    key = vio._keyframe_at_or_before(table, idx[0])
    with av.open(path) as c:
        s = c.streams.video[0]
        if key > 0:
            c.seek(table.pts[key], stream=s, backward=True, any_frame=False)
        for f in c.decode(s):
            n = table.index[f.pts]
            if n in want:
                got.append(f.to_ndarray(format="rgb24"))
            if n >= idx[-1]:
                break
    return np.stack(got)


def listing(root, n=10_000):
    folder = os.path.join(root, "many")
    for c in range(10):
        os.makedirs(os.path.join(folder, f"c{c}"), exist_ok=True)
    src = os.path.join(root, "ucf", "c0", "v0.mp4")
    for k in range(n):
        dst = os.path.join(folder, f"c{k % 10}", f"v{k}.mp4")
        if not os.path.exists(dst):
            os.link(src, dst)
    t0 = time.perf_counter()
    ds = VideoFolder(folder, "all", frames=32, size=224, stride=2)
    return dict(files=len(ds), build_s=time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=6, help="videos per set (default: 6)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (default: 3)")
    ap.add_argument("--sets", nargs="+", default=sorted(SETS), choices=sorted(SETS))
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import subprocess
    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root_dir, capture_output=True,
                            text=True).stdout.strip()
    out = {"commit": commit, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as root:
        for name in a.sets:
            write_set(root, name, a.videos)
            out[name] = bench_set(root, name, a.repeats)
            m = out[name]["median"]
            print(f"{name}: train clip {m['train_clip_ms']:.1f} ms ({m['train_clips_per_s']:.1f} clips/s; decode "
                  f"{m['decode_ms']:.1f}, transform {m['transform_ms']:.1f} = {100 * m['transform_share']:.0f} %), "
                  f"before {m['before_clips_per_s']:.1f} clips/s (fp32 transform {m['float32_transform_ms']:.1f} ms); "
                  f"plain PyAV {m['pyav_decode_ms']:.1f} ms" + (f", decord {m['decord_ms']:.1f} ms" if "decord_ms" in m
                                                                 else "") +
                  f"; eval 4x3 {m['eval_4x3_ms']:.1f} ms = {m['eval_over_train']:.2f}x a train clip; uint8 output "
                  f"(normalised on the device): train clip {m['uint8_train_clip_ms']:.1f} ms (transform "
                  f"{100 * m['uint8_transform_share']:.0f} %), eval 4x3 {m['uint8_eval_4x3_ms']:.1f} ms = "
                  f"{m['uint8_eval_over_train']:.2f}x", flush=True)
        if "ucf" in a.sets:
            out["listing"] = listing(root)
            print(f"VideoFolder over {out['listing']['files']} files: {out['listing']['build_s']:.2f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
