"""The training recipe (tubevit_ext/training.py and `tubevit train`'s options) on tiny models on the
CPU: each option does what it says."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_after_first_checkpoint, make_motion_folder
from tubevit_ext import cli
from tubevit_ext import training as tr
from tubevit_ext.models import TubeViT, losses_by_head

TUBES = cli.COMPACT_TUBES
SMALL = dict(dim=24, depth=3, num_heads=2, mlp_dim=48, tubes=TUBES, num_classes={"video": 3})


def _model(**kw):
    torch.manual_seed(0)
    return TubeViT(**{**SMALL, **kw})


def _batches(n, per, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [([torch.randn(3, 8, 32, 32, generator=g) for _ in range(per)],
             torch.randint(0, 3, (per,), generator=g).tolist()) for _ in range(n)]


def _args(**kw):
    base = dict(accum_steps=1, normalize="imagenet", label_smoothing=0.0, clip_grad=None, log_every=0, mixup=0.0,
                cutmix=0.0)
    return SimpleNamespace(**{**base, **kw})


def _epoch(model, batches, precision="fp32", ema=None, lr=1e-2, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = _args(**kw)
    return cli._train_epoch(model, model, batches, opt, sched, torch.device("cpu"), False, batches, args,
                            tr.Precision(precision, torch.device("cpu")), ema, tr.MetricsLog(None), 0, 0)


def test_accumulation_equals_one_step_of_the_whole_batch():
    """k micro-batches of b, one optimizer step, equal one step on the k*b batch (within rounding)."""
    big = _batches(1, 4)
    micro = [([big[0][0][i]], [big[0][1][i]]) for i in range(4)]
    a, b = _model().double(), _model().double()
    _epoch(a, [([s.double() for s in big[0][0]], big[0][1])])
    _epoch(b, [([s.double() for s in x], y) for x, y in micro], accum_steps=4)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    # 5 micro-batches with accum 2: steps of 2, 2 and 1; the last counts its one micro-batch fully
    c, d = _model().double(), _model().double()
    five = [([s.double() for s in x], y) for x, y in _batches(5, 1)]
    _epoch(c, [(five[0][0] + five[1][0], five[0][1] + five[1][1]), (five[2][0] + five[3][0], five[2][1] + five[3][1]),
               five[4]])
    _epoch(d, five, accum_steps=2)
    for p, q in zip(c.parameters(), d.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_clipping_bounds_the_gradient_norm():
    m = _model()
    x, y = _batches(1, 2)[0]
    losses_by_head(m(x, head=["video"] * 2), ["video"] * 2, y)[0].mul(1e3).backward()
    raw = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]).norm().item()
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    norm = tr.optimizer_step(m, opt, tr.Precision("fp32", torch.device("cpu")), clip_grad=0.5)
    assert norm == pytest.approx(raw, rel=1e-5) and raw > 0.5
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, m.parameters())]).norm().item()
    assert step == pytest.approx(0.5, rel=1e-4)  # SGD lr 1: the step is the clipped gradient
    assert all(p.grad is None for p in m.parameters())


def test_label_smoothing_is_cross_entropys():
    logits = [torch.randn(3) for _ in range(4)]
    heads, labels = ["a", "a", "b", "b"], [0, 2, 1, 1]
    total, per = losses_by_head(logits, heads, labels, label_smoothing=0.2)
    want_a = F.cross_entropy(torch.stack(logits[:2]), torch.tensor([0, 2]), label_smoothing=0.2)
    torch.testing.assert_close(per["a"], want_a)
    assert total.item() == pytest.approx(per["a"].item() + per["b"].item())


def test_layer_decay_gives_each_block_its_rate():
    m = _model()  # depth 3: layers 0 (tokenizer), 1..3 (blocks), 4 (norm, pool, heads)
    groups = tr.param_groups(m, weight_decay=0.05, layer_decay=0.5)
    by_name = {}
    ids = {id(p): n for n, p in m.named_parameters()}
    for g in groups:
        for p in g["params"]:
            by_name[ids[id(p)]] = g
    assert by_name["tokenizer.projs.0.weight"]["lr_scale"] == 0.5 ** 4
    for i in range(3):
        assert by_name[f"blocks.{i}.attn.qkv.weight"]["lr_scale"] == 0.5 ** (3 - i)
    assert by_name["heads.video.weight"]["lr_scale"] == 1.0 and by_name["norm.weight"]["lr_scale"] == 1.0
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["blocks.0.attn.qkv.bias"]["weight_decay"] == 0.0 and by_name["pool.probe"]["weight_decay"] == 0.0
    assert len(by_name) == sum(1 for _ in m.parameters())
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = tr.make_schedule(opt, "cosine", 1e-3, total_steps=10, warmup_steps=2, warmup_fraction=0.1)
    for _ in range(2):
        opt.step(), sched.step()
    rates = {g["layer"]: g["lr"] for g in opt.param_groups}
    assert rates[4] == pytest.approx(1e-3) and rates[1] == pytest.approx(1e-3 * 0.5 ** 3)  # end of warmup
    assert tr.param_groups(m, 0.05)[0]["lr_scale"] == 1.0  # no layer decay: one rate


def test_ema_update_formula():
    m = _model()
    start = {k: v.clone() for k, v in m.state_dict().items()}
    ema = tr.EMA(m, 0.9)
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.module.named_parameters()}
    ema.update(m)
    for (k, v), p in zip(ema.module.named_parameters(), m.parameters()):
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * p.detach(), msg=k)
    for k, v in old.items():  # it started as a copy of the model
        assert torch.equal(v, start[k]), k
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_bf16_autocast_is_present_in_the_step(monkeypatch):
    m = _model()
    seen = []
    real = m.blocks[0].forward

    def spy(*a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*a, **k)
    monkeypatch.setattr(m.blocks[0], "forward", spy)
    loss = _epoch(m, _batches(2, 2), precision="bf16")
    assert seen == [(True, torch.bfloat16)] * 2 and loss > 0
    seen.clear()
    _epoch(m, _batches(1, 2), precision="fp32")
    assert seen == [(False, torch.get_autocast_dtype("cpu"))]
    p16 = tr.Precision("fp16", torch.device("cpu"))
    assert p16.scaler is not None and tr.Precision("bf16", torch.device("cpu")).scaler is None
    assert tr.default_precision(torch.device("cpu")) == "fp32"


# ---------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    pytest.importorskip("av")
    root = str(tmp_path_factory.mktemp("motion") / "data")
    make_motion_folder(root, n_per_class=8, frames=10)
    return root


TRAIN = ["--model", "tiny", "--tubes", "compact", "--frames", "8", "--size", "32", "--stride", "1",
         "--batch-size", "4", "--workers", "0", "--quiet", "--no-flip", "--lr", "3e-3"]


def test_resumed_run_continues_bit_for_bit(tmp_path, data, monkeypatch):
    """Interrupted after its first epoch and resumed, a run with stochastic depth, EMA, accumulation
    and the cosine schedule ends with the same weights, EMA and metrics as an uninterrupted one."""
    opts = ["--epochs", "2", "--drop-path", "0.2", "--ema", "0.9", "--accum-steps", "2", "--sched", "cosine",
            "--warmup-epochs", "0.5", "--clip-grad", "1.0", "--label-smoothing", "0.1", "--layer-decay", "0.8",
            "--log-every", "1"]
    whole = str(tmp_path / "whole")
    cli.main(["train", "--data", data, "--out", whole, *TRAIN, *opts])
    part = str(tmp_path / "part")
    save = interrupt_after_first_checkpoint(monkeypatch)  # the run stops after its first checkpoint
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", "--data", data, "--out", part, *TRAIN, *opts])
    monkeypatch.setattr(cli, "save_checkpoint", save)
    cli.main(["train", "--data", data, "--out", part, *TRAIN, *opts, "--resume"])
    a = torch.load(os.path.join(whole, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "last.pt"), weights_only=True)
    for key in ("state_dict", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    assert a["val"] == b["val"] and a["ema_val"] == b["ema_val"]
    rows = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl"))]
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and {"val_top1", "val_top5", "ema_val_top1", "train_loss"} <= set(epochs[0])
    assert steps and {"lr", "loss", "clips_per_s", "data_wait", "peak_mem_mb", "step"} <= set(steps[0])
    assert 0.0 <= steps[0]["data_wait"] <= 1.0 and steps[0]["clips_per_s"] > 0
    part_rows = [json.loads(line) for line in open(os.path.join(part, "metrics.jsonl"))]
    assert [r["step"] for r in part_rows if r["kind"] == "step"] == [r["step"] for r in steps]


def test_export_writes_a_pretrained_directory_and_keep_prunes(tmp_path, data):
    run = str(tmp_path / "run")
    cli.main(["train", "--data", data, "--out", run, *TRAIN, "--epochs", "3", "--ema", "0.5", "--keep", "2",
              "--i2v-scaling", "1"])
    assert sorted(f for f in os.listdir(run) if f.startswith("epoch-")) == ["epoch-0002.pt", "epoch-0003.pt"]
    x = torch.randn(1, 3, 8, 32, 32)
    for extra, key in (([], "state_dict"), (["--ema"], "ema")):
        out = str(tmp_path / f"export{key}")
        cli.main(["export", run, out, "--which", "last.pt", *extra])
        got = TubeViT.from_pretrained(out).eval()
        ck = torch.load(os.path.join(run, "last.pt"), weights_only=True)
        want, _ = cli.load_checkpoint(os.path.join(run, "last.pt"))
        if key == "ema":
            want.load_state_dict(ck["ema"])
        with torch.no_grad():
            torch.testing.assert_close(got(x), want.eval()(x))
    plain = str(tmp_path / "plain")
    cli.main(["train", "--data", data, "--out", plain, *TRAIN, "--epochs", "1"])
    with pytest.raises(SystemExit, match="has no EMA weights"):
        cli.main(["export", plain, str(tmp_path / "x"), "--ema"])


def test_model_switches_reach_the_model(tmp_path, data, monkeypatch):
    """--compile, --grad-checkpointing, --varlen-attention and --i2v-scaling are applied; fp16 runs
    with a gradient scaler whose state the checkpoint keeps."""
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda m, **k: seen.setdefault("compiled", m))
    real_ckpt, real_varlen = TubeViT.set_grad_checkpointing, TubeViT.use_varlen_attention
    monkeypatch.setattr(TubeViT, "set_grad_checkpointing",
                        lambda self, enable=True: (seen.setdefault("ckpt", enable), real_ckpt(self, enable))[1])
    monkeypatch.setattr(TubeViT, "use_varlen_attention",
                        lambda self, enable=True: (seen.setdefault("varlen", enable), real_varlen(self, enable))[1])
    run = str(tmp_path / "run")
    cli.main(["train", "--data", data, "--out", run, *TRAIN, "--epochs", "1", "--compile", "--grad-checkpointing",
              "--varlen-attention", "--i2v-scaling", "2", "--precision", "fp16"])
    assert isinstance(seen.pop("compiled"), TubeViT) and seen == {"ckpt": True, "varlen": True}
    ck = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    assert ck["precision"] == "fp16" and ck["scaler"]["scale"] > 0 and ck["scaling_layer"] == 2
    model, _ = cli.load_checkpoint(run)
    assert model.scaling_layer == 2 and not any(p.requires_grad for p in model.blocks[0].parameters())


def test_tubes_command_and_tube_lists(tmp_path, capsys):
    import tubevit_ext as tv
    spec = "8,8,8/16,32,32;16,4,4/6,32,32/4,8,8;4,12,12/16,32,32/0,16,16;1,16,16/32,16,16"
    assert cli.parse_tubes(spec) == tuple(tv.PAPER_TUBES) and cli.parse_tubes("compact") == cli.COMPACT_TUBES
    for bad in ("8,8/16,32,32", "8,8,8", "a,b,c/1,1,1", ";"):
        with pytest.raises(ValueError, match="--tubes"):
            cli.parse_tubes(bad)
    for tubes, frames, size in (("paper", 32, 224), ("paper", 64, 160), (spec, 20, 28), ("compact", 8, 32)):
        rows = cli.main(["tubes", "--tubes", tubes, "--frames", str(frames), "--size", str(size)])
        tl = cli.parse_tubes(tubes)
        assert rows[-1]["tokens"] == tv.num_tokens(tl, (frames, size, size))
        assert [r["tokens"] for r in rows[:-1]] == tv.geometry.tube_token_counts(tl, (frames, size, size))
        assert 0 < rows[-1]["voxel_share"] <= 1
    assert rows[-1]["flops"] == sum(2 * 3 * t.kernel[0] * t.kernel[1] * t.kernel[2] * 768 * n
                                    for t, n in zip(tl, [r["tokens"] for r in rows[:-1]]))
    # the paper's tubes at 32 x 224^2: 539 tokens, 2 d sum(n K) = 0.896 GFLOP (bench/DESIGN.md's floor)
    rows = cli.main(["tubes", "--frames", "32", "--size", "224", "--plot", str(tmp_path / "t.png")])
    assert rows[-1]["tokens"] == 539 and round(rows[-1]["flops"] / 1e9, 3) == 0.896
    pytest.importorskip("matplotlib")
    assert (tmp_path / "t.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="tube 1 .* yields no tokens"):
        cli.main(["tubes", "--frames", "8", "--size", "224"])


def test_config_file_round_trips_to_the_flags(tmp_path):
    flags = ["train", "--data", "D", "--out", "O", "--accum-steps", "4", "--layer-decay", "0.75", "--ema", "0.999",
             "--sched", "cosine", "--warmup-epochs", "5", "--tubes", "compact", "--precision", "bf16"]
    want = vars(cli._parser().parse_args(flags))
    cfg = {k: want[k] for k in ("accum_steps", "layer_decay", "ema", "sched", "warmup_epochs", "tubes", "precision")}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(cfg))
    got = vars(cli._with_config(cli._parser(), ["train", "--data", "D", "--out", "O", "--config", str(path)]))
    assert {k: got[k] for k in cfg} == cfg and got["config"] == str(path)
    over = vars(cli._with_config(cli._parser(), ["train", "--data", "D", "--out", "O", "--config", str(path),
                                                 "--accum-steps", "2"]))
    assert over["accum_steps"] == 2 and over["ema"] == 0.999  # the command line wins
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        ypath = tmp_path / "recipe.yaml"
        ypath.write_text(yaml.safe_dump({k.replace("_", "-"): v for k, v in cfg.items()}))
        got = vars(cli._with_config(cli._parser(), ["train", "--data", "D", "--out", "O", "--config", str(ypath)]))
        assert {k: got[k] for k in cfg} == cfg
    path.write_text(json.dumps({"acum_steps": 2}))
    with pytest.raises(SystemExit, match=r"unknown train options \['acum_steps'\]"):
        cli._with_config(cli._parser(), ["train", "--data", "D", "--out", "O", "--config", str(path)])


def test_validation_clips_and_crops_and_the_plot(tmp_path, data):
    run = str(tmp_path / "run")
    res = cli.main(["train", "--data", data, "--out", run, *TRAIN, "--epochs", "2", "--val-clips", "2",
                    "--val-crops", "3", "--log-every", "1"])
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [(r["val_clips"], r["val_crops"]) for r in rows if r["kind"] == "epoch"] == [(2, 3), (2, 3)]
    assert len(res["history"]) == 2
    pytest.importorskip("matplotlib")
    out = cli.main(["plot", run])
    assert os.path.getsize(out) > 1000


def test_mixup_and_cutmix_mix_whole_clips_within_a_head():
    g = torch.Generator().manual_seed(0)
    clips = [torch.rand(3, 4, 16, 16, generator=g) for _ in range(4)]
    images = [torch.rand(3, 16, 16, generator=g) for _ in range(2)]
    samples, heads = clips + images, ["video"] * 4 + ["image"] * 2
    labels, classes = [0, 1, 2, 3, 3, 4], {"video": 4, "image": 5}  # distinct within each head
    torch.manual_seed(1)
    mixed, targets, lam = tr.mix_batch(samples, labels, heads, classes, mixup=0.8)
    assert 0.0 < lam < 1.0
    for i, (m, t) in enumerate(zip(mixed, targets)):
        assert t.shape == (classes[heads[i]],) and t.sum().item() == pytest.approx(1.0)
        partners = [k for k in range(len(samples)) if heads[k] == heads[i] and k != i
                    and torch.allclose(m, lam * samples[i] + (1 - lam) * samples[k])]
        if partners:  # x = lam x_i + (1 - lam) x_j, and the label mixed with the same lambda
            j = partners[0]
            assert t[labels[i]].item() == pytest.approx(lam) and t[labels[j]].item() == pytest.approx(1 - lam)
        else:  # paired with itself
            assert torch.equal(m, samples[i]) and t[labels[i]].item() == 1.0
    for seed in range(20):  # a batch whose lambda leaves a box of some size
        torch.manual_seed(seed)
        cut, targets, lam = tr.mix_batch(samples, labels, heads, classes, cutmix=1.0)
        if lam < 0.9:
            break
    boxes = 0
    for i in range(4):
        changed = (cut[i] != samples[i]).any(0)  # (T, H, W): where a partner's pixels were pasted
        assert targets[i].sum().item() == pytest.approx(1.0)
        if changed.any():
            boxes += 1
            assert all(torch.equal(changed[0], changed[t]) for t in range(4))  # the same box in every frame
            assert 1 - changed[0].float().mean().item() == pytest.approx(lam)  # lambda is the area kept
            assert targets[i][labels[i]].item() == pytest.approx(lam)
    assert boxes > 0
    loss, _ = losses_by_head([torch.randn(classes[h]) for h in heads], heads, targets)
    assert loss.item() > 0  # soft targets go through the loss


def test_randaugment_and_erasing_are_the_same_in_every_frame():
    pytest.importorskip("torchvision")
    from tubevit_ext.video import transforms as T
    frame = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    clip = frame.expand(3, 6, 32, 32).contiguous()  # six identical frames
    aug = T.clip_augment((2, 9), 1.0)
    for seed in range(5):
        out = aug(clip, torch.Generator().manual_seed(seed))
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert all(torch.equal(out[:, 0], out[:, t]) for t in range(6))
        assert not torch.equal(out, clip)
    a = aug(clip, torch.Generator().manual_seed(7))
    assert torch.equal(a, aug(clip, torch.Generator().manual_seed(7)))  # the sample's generator decides
    assert T.clip_augment(None, 0.0) is None


def test_augmented_and_mixed_training_runs(tmp_path, data):
    pytest.importorskip("torchvision")
    run = str(tmp_path / "run")
    res = cli.main(["train", "--data", data, "--out", run, *TRAIN, "--epochs", "1", "--mixup", "0.8", "--cutmix",
                    "1.0", "--randaugment", "2,9", "--random-erase", "0.25", "--label-smoothing", "0.1"])
    assert len(res["history"]) == 1 and res["history"][0]["train_loss"] > 0
    with pytest.raises(SystemExit, match="give N,M"):
        cli.main(["train", "--data", data, "--out", run, *TRAIN, "--epochs", "1", "--randaugment", "9"])
