"""From video files to a trained TubeViT and a prediction: ``python -m tubevit_ext <command>``
(or the ``tubevit`` console script).

    tubevit train --data DIR --out RUN_DIR [--model ti] [--frames 32] [--size 224] [--epochs 10]
                  [--batch-size 8] [--lr 1e-4] [--images DIR] [--init VIT.pth] [--resume] [--device cuda]
    tubevit eval --checkpoint RUN_DIR_OR_FILE --data DIR [--clips 4] [--crops 3] [--json out.json]
    tubevit predict --checkpoint RUN_DIR_OR_FILE FILE [FILE ...] [--topk 5]
    tubevit export RUN_DIR_OR_FILE OUT_DIR [--ema]        # save_pretrained's directory

Training recipe (``tubevit train --help``): --precision bf16|fp16|fp32, --accum-steps, --clip-grad,
--label-smoothing, --layer-decay, --ema, --drop-path, --i2v-scaling, --sched onecycle|cosine with
--warmup-epochs, --grad-checkpointing, --compile, --varlen-attention; RUN_DIR/metrics.jsonl gets a
row every --log-every optimizer steps (loss per head, lr, clips/s, the fraction of time waiting for
data, peak memory) and one per epoch (validation top-1 / top-5, of the EMA weights too).

DIR holds one sub-folder per class (UCF101 / HMDB / Kinetics layout), with train/ and val/
sub-trees or split deterministically (``tubevit_ext.video.datasets``). A run directory gets
``last.pt`` (every epoch) and ``best.pt`` (best validation top-1), each written atomically
(a temporary file, then a rename), holding the model's configuration, weights, class names,
optimizer, schedule, scaler, EMA and generator states and epoch, all plain containers and tensors
(loaded with weights_only=True); ``--resume`` continues from ``last.pt`` as the uninterrupted run
would have, bit for bit on the CPU. Under ``torchrun`` training
runs DistributedDataParallel over the processes (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
import warnings
from typing import Dict, List

import torch
import torch.nn.functional as F

from .geometry import PAPER_TUBES, Tube
from .models import TubeViT, load_image_vit, losses_by_head
from .models.pretrained import current_config, model_from_config
from .models.factories import SIZES

CHECKPOINT_FORMAT = "tubevit_ext-checkpoint-1"
# --blocks: TubeViT options that match the image ViT a run starts from (models/convert.py)
BLOCK_STYLES = {"vit": {}, "clip": dict(pre_norm=True, eps=1e-5),
                "clip-quickgelu": dict(pre_norm=True, eps=1e-5, act="quick_gelu")}
#: Tubes for short, small clips (8 frames of 32x32 and up): a space-time tube, a long thin
#: temporal tube with a spatial offset, and the one-frame image tube.
COMPACT_TUBES = (Tube((4, 8, 8), (4, 8, 8)), Tube((8, 4, 4), (8, 8, 8), (0, 2, 2)), Tube((1, 8, 8), (8, 8, 8)))
TUBE_SETS = {"paper": PAPER_TUBES, "compact": COMPACT_TUBES}


def parse_tubes(spec: str):
    """A --tubes value: a name of TUBE_SETS, or a tube list "kt,kh,kw/st,sh,sw/ot,oh,ow;..." (the
    offset may be left out: 0,0,0), e.g. "8,8,8/16,32,32;1,16,16/32,16,16"."""
    if spec in TUBE_SETS:
        return TUBE_SETS[spec]
    tubes = []
    for k, part in enumerate(p for p in spec.replace(" ", "").split(";") if p):
        fields = part.split("/")
        try:
            triples = [tuple(int(v) for v in f.split(",")) for f in fields]
        except ValueError:
            triples = []
        if len(fields) not in (2, 3) or len(triples) != len(fields) or any(len(t) != 3 for t in triples):
            raise ValueError(f"--tubes: tube {k} ({part!r}) must be kt,kh,kw/st,sh,sw[/ot,oh,ow]; "
                             f"or one of {sorted(TUBE_SETS)}")
        tubes.append(Tube(*triples))
    if not tubes:
        raise ValueError(f"--tubes: no tube in {spec!r}")
    return tuple(tubes)
#: Model sizes: the paper's ViT sizes plus "tiny" (96 wide, 3 blocks) for small data and quick runs.
MODEL_SIZES = {**SIZES, "tiny": dict(dim=96, depth=3, num_heads=4, mlp_dim=192)}


# ---------------------------------------------------------------- distributed
def _dist_setup(device: str):
    """(rank, world, local_rank) under torchrun (WORLD_SIZE > 1), else (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _all_reduce_sum(values: List[float], world: int, device) -> List[float]:
    if world <= 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, ckpt: dict) -> None:
    """torch.save to a temporary file in the same folder, then an atomic rename: an interrupted
    write never leaves a truncated checkpoint behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def _checkpoint_path(path: str, which: str = "best.pt") -> str:
    if os.path.isdir(path):
        for name in (which, "last.pt"):
            if os.path.exists(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path} holds no checkpoint (best.pt or last.pt)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    return path


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint dict in ``path``, loaded with ``weights_only=True``: a checkpoint holds only
    containers, numbers, strings and tensors, so a file that needs anything else unpickled (which
    could run code) is refused with a ValueError naming it, as is one that is not a tubevit_ext
    checkpoint."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable tubevit_ext checkpoint; it is loaded with weights_only=True, "
                         f"which refuses pickled objects ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a tubevit_ext checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return ckpt


def load_checkpoint(path: str, which: str = "best.pt", map_location="cpu"):
    """(model, checkpoint dict) from a run directory (its best.pt, else last.pt) or a file."""
    path = _checkpoint_path(path, which)
    ckpt = read_checkpoint(path, map_location)
    model = model_from_config(ckpt["config"])
    if ckpt.get("scaling_layer") is not None:
        model.enable_image_to_video_scaling(ckpt["scaling_layer"])
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt


# ---------------------------------------------------------------- data
def _loader(ds, batch_size, shuffle, workers, seed, world, rank, drop_last=False):
    from torch.utils.data import DataLoader, DistributedSampler
    from .video.datasets import collate_samples, seed_worker
    sampler = DistributedSampler(ds, world, rank, shuffle=shuffle, seed=seed) if world > 1 else None
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, worker_init_fn=seed_worker, generator=g, collate_fn=collate_samples,
                      drop_last=drop_last, persistent_workers=False)


def _check_fits(tubes, frames: int, size: int):
    """Names the tube that does not fit clips of (frames, size, size)."""
    from .geometry import tube_token_counts
    try:
        tube_token_counts(tubes, (frames, size, size))
    except ValueError as e:
        raise SystemExit(f"--frames {frames} --size {size}: {e}") from None


# ---------------------------------------------------------------- train
def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit="step", mininterval=1.0)
    except ImportError:
        return iterable


def _to_device(x: torch.Tensor, device, normalize: str) -> torch.Tensor:
    """A clip on the training device, normalised there when the workers handed it over as uint8
    (--normalize-on-device)."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:  # (C, T, H, W), or an evaluation's (clips x crops, C, T, H, W)
        from .video.transforms import normalize as normalize_
        x = normalize_(x, normalize) if x.dim() == 4 else torch.stack([normalize_(c, normalize) for c in x])
    return x


@torch.no_grad()
def _evaluate_loader(model, loader, device, head, world, normalize="imagenet") -> Dict[str, float]:
    """Top-1 / top-5 over a loader of (clips, labels); a sample with several clips / crops
    averages their softmax scores."""
    model.eval()
    correct1 = correct5 = n = 0
    for samples, labels in loader:
        for x, y in zip(samples, labels):
            x = _to_device(x, device, normalize)
            batch = x if x.dim() == 5 else x[None]
            probs = F.softmax(model(batch, head=head).float(), -1).mean(0)
            top = probs.topk(min(5, probs.numel())).indices.tolist()
            correct1 += int(top[0] == int(y))
            correct5 += int(int(y) in top)
            n += 1
    model.train()
    c1, c5, n = _all_reduce_sum([correct1, correct5, n], world, device)
    return {"top1": c1 / max(n, 1), "top5": c5 / max(n, 1), "samples": int(n)}


def _setup(args):
    """Processes and device: (rank, world, device, is_main)."""
    rank, world, local_rank = _dist_setup(args.device)
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" and world > 1 else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    return rank, world, device, rank == 0


def _datasets(args):
    """(train videos, val videos, train images or None, {head: classes}, {head: class names})."""
    from .video.datasets import ImageFolder, VideoFolder
    _check_fits(parse_tubes(args.tubes), args.frames, args.size)
    common = dict(frames=args.frames, size=args.size, stride=args.stride, target_fps=args.target_fps,
                  on_error=args.on_error, seed=args.seed, normalize=args.normalize,
                  output="uint8" if args.normalize_on_device else "float")
    from .video.transforms import clip_augment
    ra = tuple(int(v) for v in args.randaugment.split(",")) if args.randaugment else None
    if ra is not None and len(ra) != 2:
        raise SystemExit(f"--randaugment {args.randaugment}: give N,M (ops per clip, magnitude), e.g. 2,9")
    train_ds = VideoFolder(args.data, "train", flip=not args.no_flip, augment=clip_augment(ra, args.random_erase),
                           **common)
    val_ds = VideoFolder(args.data, "val", clips=args.val_clips, crops=args.val_crops, train=False, **common)
    if val_ds.classes != train_ds.classes:
        raise SystemExit(f"{args.data}: train and val class folders differ ({train_ds.classes} vs {val_ds.classes})")
    num_classes, classes = {"video": len(train_ds.classes)}, {"video": train_ds.classes}
    images = None
    if args.images:
        images = ImageFolder(args.images, "train", size=args.size, seed=args.seed, on_error=args.on_error,
                             normalize=args.normalize)
        num_classes["image"], classes["image"] = len(images.classes), images.classes
    return train_ds, val_ds, images, num_classes, classes


def _model(args, num_classes, device, main):
    """The TubeViT of --model / --tubes / --blocks / --drop-path, from --init's image ViT when
    given, with --i2v-scaling, --grad-checkpointing and --varlen-attention applied."""
    model = TubeViT(**MODEL_SIZES[args.model], num_classes=num_classes, tubes=parse_tubes(args.tubes),
                    drop_path_rate=args.drop_path, **BLOCK_STYLES[args.blocks])
    if args.init:
        sd = torch.load(args.init, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        unused = load_image_vit(model, sd)
        if main:
            print(f"initialised from {args.init} (unused: {', '.join(unused) or 'nothing'})")
    if args.i2v_scaling is not None:
        model.enable_image_to_video_scaling(args.i2v_scaling)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    if args.varlen_attention:
        model.use_varlen_attention()
    return model.to(device)


def _resume(path: str, model, opt, classes, main):
    """Model and optimizer state from the run's last.pt: (checkpoint, first epoch, best top-1); the
    caller restores the schedule, scaler, EMA and RNG state from the checkpoint."""
    if not os.path.exists(path):
        raise SystemExit(f"--resume: {path} does not exist")
    try:
        ck = read_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"--resume: {e}") from None
    saved = current_config(ck["config"])
    mismatch = [k for k in model.config if saved.get(k) != model.config[k]]
    if mismatch or ck["classes"] != classes or ck.get("scaling_layer") != model.scaling_layer:
        mismatch += [] if ck.get("scaling_layer") == model.scaling_layer else ["--i2v-scaling"]
        raise SystemExit(f"--resume: {path} is of another model or class set "
                         f"(differs in {', '.join(mismatch) or 'class names'}); use another --out")
    model.load_state_dict(ck["state_dict"])
    opt.load_state_dict(ck["optimizer"])
    if main:
        print(f"resuming {path} after epoch {ck['epoch'] + 1}")
    return ck, ck["epoch"] + 1, ck.get("best_top1", -1.0)


def _train_epoch(net, model, loader, opt, sched, device, joint: bool, bar, args, precision, ema, log,
                 epoch: int, step0: int) -> float:
    """One pass over the loader with gradient accumulation (--accum-steps micro-batches per
    optimizer step, the last step of the epoch taking what is left), clipping, the EMA update and
    the metrics log; returns the mean training loss."""
    from .training import mix_batch, optimizer_step
    loss_sum, n, accum = 0.0, len(loader), max(1, args.accum_steps)
    it, t_wait = iter(bar), time.perf_counter()
    for i in range(n):
        batch = next(it)
        if joint:
            samples, heads, labels = batch
        else:
            samples, labels = batch
            heads = ["video"] * len(samples)
        log.waited(time.perf_counter() - t_wait, len(samples))
        samples = [_to_device(s, device, args.normalize) for s in samples]
        if args.mixup or args.cutmix:  # soft targets from here on
            samples, labels, _ = mix_batch(samples, list(labels), heads, model.config["num_classes"], args.mixup,
                                           args.cutmix)
        last = (i + 1) % accum == 0 or i + 1 == n
        group = accum if i // accum < n // accum else n % accum  # micro-batches in this step
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with precision.autocast():
                loss, per_head = losses_by_head(net(samples, head=heads), heads, labels,
                                                label_smoothing=args.label_smoothing)
            scaled = loss / group
            (precision.scaler.scale(scaled) if precision.scaler is not None else scaled).backward()
        loss_sum += loss.item()
        if last:
            optimizer_step(model, opt, precision, args.clip_grad)
            sched.step()
            if ema is not None:
                ema.update(model)
            step = step0 + (i + 1 + accum - 1) // accum
            if args.log_every and step % args.log_every == 0:
                log.write(kind="step", epoch=epoch + 1, step=step, lr=opt.param_groups[-1]["lr"],
                          loss={h: v.item() for h, v in per_head.items()}, **log.window(),
                          peak_mem_mb=(torch.cuda.max_memory_allocated(device) / 2 ** 20
                                       if device.type == "cuda" else None))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({f"loss_{h}": f"{v.item():.3f}" for h, v in per_head.items()}, refresh=False)
        t_wait = time.perf_counter()
    return loss_sum / max(n, 1)


def train(args) -> dict:
    from .training import EMA, MetricsLog, Precision, default_precision, make_schedule, param_groups, rng_state, \
        set_rng_state
    from .video.datasets import JointLoader
    rank, world, device, main = _setup(args)
    train_ds, val_ds, images, num_classes, classes = _datasets(args)
    data_cfg = dict(frames=args.frames, size=args.size, stride=args.stride, target_fps=args.target_fps,
                    normalize=args.normalize, tubes=args.tubes, model=args.model)
    model = _model(args, num_classes, device, main)
    precision = Precision(args.precision or default_precision(device), device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=args.lr)
    ema = EMA(model, args.ema) if args.ema else None
    os.makedirs(args.out, exist_ok=True)
    last_path = os.path.join(args.out, "last.pt")
    ck, start_epoch, best = (_resume(last_path, model, opt, classes, main) if args.resume else (None, 0, -1.0))
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    per_proc = max(1, args.batch_size // world)
    vloader = _loader(train_ds, per_proc, True, args.workers, args.seed, world, rank, drop_last=True)
    if len(vloader) == 0:
        raise SystemExit(f"--batch-size {args.batch_size}: larger than the {len(train_ds)} training videos")
    loader = vloader
    if images is not None:
        loader = JointLoader(vloader, _loader(images, per_proc, True, args.workers, args.seed, world, rank,
                                              drop_last=True))
    vval = _loader(val_ds, 1, False, args.workers, args.seed, world, rank)
    steps_per_epoch = math.ceil(len(loader) / max(1, args.accum_steps))
    sched = make_schedule(opt, args.sched, args.lr, args.epochs * steps_per_epoch,
                          round(args.warmup_epochs * steps_per_epoch), args.warmup)
    if ck is not None:  # the schedule, scaler, EMA and generators where the interrupted run left them
        sched.load_state_dict(ck["scheduler"])
        for g, lr in zip(opt.param_groups, sched.get_last_lr()):  # building the schedule reset them
            g["lr"] = lr
        if precision.scaler is not None and ck.get("scaler"):
            precision.scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        if ck.get("rng") is not None:
            set_rng_state(ck["rng"])
    log = MetricsLog(os.path.join(args.out, "metrics.jsonl") if main else None)
    history = []
    for epoch in range(start_epoch, args.epochs):
        for ds in (train_ds,) + ((images,) if images is not None else ()):
            ds.set_epoch(epoch)
        for ld in (vloader,) + ((loader.images,) if images is not None else ()):
            if hasattr(ld.sampler, "set_epoch"):
                ld.sampler.set_epoch(epoch)
            ld.generator.manual_seed(args.seed * 1_000_003 + epoch)  # the epoch's order, resumed or not
        t0 = time.time()
        bar = _progress(loader, len(loader), f"epoch {epoch + 1}/{args.epochs}", main and not args.quiet)
        train_loss = _train_epoch(net, model, loader, opt, sched, device, images is not None, bar, args, precision,
                                  ema, log, epoch, epoch * steps_per_epoch)
        acc = _evaluate_loader(model, vval, device, "video", world, args.normalize)
        ema_acc = _evaluate_loader(ema.module, vval, device, "video", world, args.normalize) if ema else None
        score = (ema_acc or acc)["top1"]
        epoch_log = dict(epoch=epoch + 1, train_loss=train_loss, val_top1=acc["top1"], val_top5=acc["top5"],
                         seconds=time.time() - t0)
        if ema_acc is not None:
            epoch_log.update(ema_val_top1=ema_acc["top1"], ema_val_top5=ema_acc["top5"])
        history.append(epoch_log)
        log.write(kind="epoch", val_clips=args.val_clips, val_crops=args.val_crops, **epoch_log)
        if main:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {train_loss:.3f}, val top-1 {acc['top1']:.3f}, "
                  f"top-5 {acc['top5']:.3f}" + (f", EMA top-1 {ema_acc['top1']:.3f}" if ema_acc else "")
                  + f" ({acc['samples']} videos, {epoch_log['seconds']:.0f}s)", flush=True)
            ckpt = dict(format=CHECKPOINT_FORMAT, config=model.config, data=data_cfg, classes=classes,
                        scaling_layer=model.scaling_layer, state_dict=model.state_dict(), optimizer=opt.state_dict(),
                        scheduler=sched.state_dict(), epoch=epoch, best_top1=max(best, score), val=acc,
                        ema=ema.state_dict() if ema else None, ema_val=ema_acc,
                        scaler=precision.scaler.state_dict() if precision.scaler is not None else None,
                        precision=precision.name, rng=rng_state())
            save_checkpoint(last_path, ckpt)
            if score > best:
                save_checkpoint(os.path.join(args.out, "best.pt"), ckpt)
            if args.keep:
                save_checkpoint(os.path.join(args.out, f"epoch-{epoch + 1:04d}.pt"), ckpt)
                _prune(args.out, args.keep)
        best = max(best, score)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    return dict(best_top1=best, history=history)


def _prune(run_dir: str, keep: int) -> None:
    """Only the newest ``keep`` epoch-NNNN.pt checkpoints stay (last.pt and best.pt always do)."""
    epochs = sorted(f for f in os.listdir(run_dir) if f.startswith("epoch-") and f.endswith(".pt"))
    for f in epochs[:-keep]:
        os.remove(os.path.join(run_dir, f))


def tubes(args) -> List[dict]:
    """Per tube: the token grid at --frames x --size x --size, its tokens, the multiply-adds per token
    (2 * K * d FLOPs) and the share of the clip's voxels its windows see; then the totals."""
    from .geometry import token_grid, tube_token_counts
    tl = parse_tubes(args.tubes)
    size = (args.frames, args.size, args.size)
    counts = tube_token_counts(tl, size)  # names the tube that does not fit
    rows, voxels = [], args.frames * args.size * args.size
    seen_all = torch.zeros(size, dtype=torch.bool)
    for i, (t, n) in enumerate(zip(tl, counts)):
        grid = token_grid(t, size)
        idx = [torch.zeros(L, dtype=torch.bool) for L in size]
        for ax in range(3):
            for j in range(grid[ax]):
                start = t.offset[ax] + j * t.stride[ax]
                idx[ax][start:start + t.kernel[ax]] = True
        seen = idx[0][:, None, None] & idx[1][None, :, None] & idx[2][None, None, :]
        seen_all |= seen
        K = 3 * t.kernel[0] * t.kernel[1] * t.kernel[2]
        rows.append(dict(tube=i, kernel=t.kernel, stride=t.stride, offset=t.offset, grid=grid, tokens=n,
                         flops_per_token=2 * K * args.dim, voxel_share=seen.sum().item() / voxels))
    total = dict(tokens=sum(counts), flops=sum(r["tokens"] * r["flops_per_token"] for r in rows),
                 voxel_share=seen_all.sum().item() / voxels)
    for r in rows:
        print(f"tube {r['tube']}: kernel {r['kernel']} stride {r['stride']} offset {r['offset']}: grid {r['grid']}, "
              f"{r['tokens']} tokens, {r['flops_per_token'] / 1e6:.2f} MFLOP/token, sees {100 * r['voxel_share']:.1f} % "
              f"of the voxels")
    print(f"total: {total['tokens']} tokens, {total['flops'] / 1e9:.3f} GFLOP per clip in the tokenizer (d = {args.dim}), "
          f"the tubes see {100 * total['voxel_share']:.1f} % of the voxels")
    if args.plot:
        _plot_tubes(tl, size, args.plot)
    return rows + [total]


def _plot_tubes(tl, size, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from .geometry import token_grid
    fig, axes = plt.subplots(1, len(tl), figsize=(3.2 * len(tl), 3.4), squeeze=False)
    for ax, (i, t) in zip(axes[0], enumerate(tl)):
        grid = token_grid(t, size)
        for jh in range(grid[1]):
            for jw in range(grid[2]):
                ax.add_patch(Rectangle((t.offset[2] + jw * t.stride[2], t.offset[1] + jh * t.stride[1]),
                                       t.kernel[2], t.kernel[1], fill=True, alpha=0.35, lw=0.3, ec="k"))
        ax.set(xlim=(0, size[2]), ylim=(size[1], 0), aspect="equal",
               title=f"tube {i}: {t.kernel[0]}x{t.kernel[1]}x{t.kernel[2]}\n{grid[0]} time steps of {grid[1]}x{grid[2]}")
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def plot(args) -> str:
    """Loss per head and learning rate by step, validation top-1 by epoch, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(args.run, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{args.run} has no metrics.jsonl (a run of this version of tubevit train)")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    steps = [r for r in rows if r.get("kind") == "step"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for head in sorted({h for r in steps for h in r["loss"]}):
        pts = [(r["step"], r["loss"][head]) for r in steps if head in r["loss"]]
        axes[0].plot(*zip(*pts), label=f"loss {head}")
    if steps:
        axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps])
    for key in ("val_top1", "ema_val_top1"):
        pts = [(r["epoch"], r[key]) for r in epochs if key in r]
        if pts:
            axes[2].plot(*zip(*pts), marker="o", label=key)
    for ax, title in zip(axes, ("training loss", "learning rate", "validation top-1")):
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_xlabel("step"), axes[1].set_xlabel("step"), axes[2].set_xlabel("epoch")
    fig.tight_layout()
    out = args.out or os.path.join(args.run, "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"plot: {out}")
    return out


def export(args) -> str:
    """A run's checkpoint as a save_pretrained directory (config.json + weights); --ema exports the
    EMA weights."""
    model, ck = load_checkpoint(args.run, which=args.which)
    if args.ema:
        if ck.get("ema") is None:
            raise SystemExit(f"{_checkpoint_path(args.run, args.which)}: has no EMA weights (trained without --ema)")
        model.load_state_dict(ck["ema"])
    model.save_pretrained(args.dir)
    print(f"exported {_checkpoint_path(args.run, args.which)} -> {args.dir}")
    return args.dir


# ---------------------------------------------------------------- eval / predict
def evaluate(args) -> dict:
    from .video.datasets import VideoFolder
    model, ck = load_checkpoint(args.checkpoint)
    d = ck["data"]
    ds = VideoFolder(args.data, args.split, frames=d["frames"], size=d["size"], stride=d["stride"],
                     target_fps=d["target_fps"], clips=args.clips, crops=args.crops, normalize=d["normalize"],
                     on_error=args.on_error, train=False)
    if ds.classes != ck["classes"]["video"]:
        raise SystemExit(f"{args.data}: its classes {ds.classes} are not the checkpoint's {ck['classes']['video']}")
    model.to(args.device)
    res = _evaluate_loader(model, _loader(ds, 1, False, args.workers, 0, 1, 0), torch.device(args.device), "video", 1)
    res.update(clips=args.clips, crops=args.crops, checkpoint=_checkpoint_path(args.checkpoint), data=args.data,
               split=args.split)
    print(f"top-1 {res['top1']:.4f}  top-5 {res['top5']:.4f}  ({res['samples']} videos, "
          f"{args.clips} clips x {args.crops} crops)")
    out = args.json or os.path.join(os.path.dirname(res["checkpoint"]), f"eval-{args.split}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"json: {out}")
    return res


@torch.no_grad()
def predict(args) -> List[dict]:
    from .video import io as vio
    from .video.transforms import ClipTransform, frame_step, uniform_clips
    model, ck = load_checkpoint(args.checkpoint)
    model.to(args.device).eval()
    d = ck["data"]
    names = ck["classes"]["video"]
    tf = ClipTransform(d["size"], train=False, crops=args.crops, normalize=d["normalize"])
    out = []
    for path in args.files:
        info = vio.probe(path)
        step = frame_step(d["stride"], info.fps, d["target_fps"])
        clips = []
        for idx in uniform_clips(info.num_frames, d["frames"], step, args.clips):
            y = tf(vio.read_frames(path, idx))
            clips.append(y if y.dim() == 5 else y[None])
        probs = F.softmax(model(torch.cat(clips).to(args.device), head="video").float(), -1).mean(0)
        top = probs.topk(min(args.topk, len(names)))
        pairs = [(names[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
        out.append(dict(file=path, top=pairs))
        print(f"{path}: " + ", ".join(f"{n} {p:.3f}" for n, p in pairs))
    return out


# ---------------------------------------------------------------- argument parsing
def _parser():
    p = argparse.ArgumentParser(prog="tubevit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    t = sub.add_parser("train", help="train on a folder of videos (one sub-folder per class)")
    t.add_argument("--data", required=True, help="video folder: DATA/<class>/*.mp4 (or DATA/train, DATA/val)")
    t.add_argument("--out", required=True, help="run directory for last.pt / best.pt")
    t.add_argument("--model", choices=sorted(MODEL_SIZES), default="ti", help="ViT size (default: ti)")
    t.add_argument("--config", help="JSON or YAML file of train options (its keys: the options' names, "
                   "e.g. accum_steps); options given on the command line override it")
    t.add_argument("--tubes", default="paper",
                   help="paper: the paper's four tubes (frames >= 20, size >= 28); compact: for short small "
                        "clips (frames >= 8, size >= 16); or a list kt,kh,kw/st,sh,sw/ot,oh,ow;... "
                        "(default: paper)")
    t.add_argument("--val-clips", type=int, default=1, help="clips per validation video (default: 1)")
    t.add_argument("--val-crops", type=int, choices=[1, 3], default=1, help="crops per validation clip (default: 1)")
    t.add_argument("--frames", type=int, default=32, help="frames per clip (default: 32)")
    t.add_argument("--size", type=int, default=224, help="crop size (default: 224)")
    t.add_argument("--stride", type=int, default=2, help="frame stride within a clip (default: 2)")
    t.add_argument("--target-fps", type=float, default=None, help="sample clips at this rate instead of --stride")
    t.add_argument("--epochs", type=int, default=10, help="(default: 10)")
    t.add_argument("--batch-size", type=int, default=8, help="videos per step, over all processes (default: 8)")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    t.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW's, on weights only: no decay for biases, norms and no_weight_decay() (default: 0.05)")
    t.add_argument("--sched", choices=["onecycle", "cosine"], default="onecycle",
                   help="onecycle (--warmup: fraction of steps up) or cosine (linear warmup over --warmup-epochs, "
                        "then cosine to 0) (default: onecycle)")
    t.add_argument("--warmup", type=float, default=0.1, help="onecycle: fraction of steps warming up (default: 0.1)")
    t.add_argument("--warmup-epochs", type=float, default=0.0, help="cosine: epochs of linear warmup (default: 0)")
    t.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="autocast dtype (fp16 with a gradient scaler) (default: bf16 on a CUDA GPU that has it, "
                        "else fp32)")
    t.add_argument("--accum-steps", type=int, default=1,
                   help="micro-batches per optimizer step: a batch of --batch-size x this (default: 1)")
    t.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm to this")
    t.add_argument("--label-smoothing", type=float, default=0.0, help="(default: 0)")
    t.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="mixup of whole clips within a head, lambda ~ Beta(ALPHA, ALPHA) (e.g. 0.8)")
    t.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="cutmix: one box, the same in every frame (e.g. 1.0); with --mixup, one of the two per batch")
    t.add_argument("--randaugment", default=None, metavar="N,M",
                   help="RandAugment, N ops of magnitude M, the same for every frame of a clip (needs torchvision)")
    t.add_argument("--random-erase", type=float, default=0.0, metavar="P",
                   help="random erasing with probability P, the same box in every frame (needs torchvision)")
    t.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise learning-rate decay: layer l of L at lr * decay^(L-1-l) (e.g. 0.75)")
    t.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an EMA of the weights (e.g. 0.9998), validate it and pick best.pt by it")
    t.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block (default: 0)")
    t.add_argument("--i2v-scaling", type=int, default=None, metavar="LAYER",
                   help="image-to-video scaling (paper §3.6): blocks below LAYER frozen, tube tokens gated in at it")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--varlen-attention", action="store_true",
                   help="one varlen FlashAttention call per block for joint batches (CUDA, fp16/bf16)")
    t.add_argument("--log-every", type=int, default=10,
                   help="optimizer steps between metrics.jsonl rows (0: epochs only) (default: 10)")
    t.add_argument("--keep", type=int, default=0, help="also keep the newest N epoch-NNNN.pt checkpoints")
    t.add_argument("--images", help="image folder (one sub-folder per class) for joint training, its own head")
    t.add_argument("--init", help="image-ViT state_dict file to start from (torchvision, timm, HuggingFace ViT or "
                                  "CLIP, OpenCLIP layout)")
    t.add_argument("--blocks", choices=sorted(BLOCK_STYLES), default="vit",
                   help="block style: vit (default), clip (a LayerNorm before the blocks, eps 1e-5: OpenCLIP "
                        "towers) or clip-quickgelu (the same with QuickGELU: OpenAI's CLIP weights)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--device", default=default_device, help=f"(default: {default_device})")
    t.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding (default: 2)")
    t.add_argument("--normalize", default="imagenet", help="imagenet (default), clip, inception or none")
    t.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                   help="unreadable files: skip with a warning naming each (default), or raise")
    t.add_argument("--normalize-on-device", action="store_true",
                   help="workers hand uint8 clips to the training device, which normalises them (a quarter "
                        "of the bytes through the loader; the workers skip the fp32 pass)")
    t.add_argument("--no-flip", action="store_true",
                   help="no random horizontal flips (for classes a mirror image changes, e.g. left vs right)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="top-1 / top-5 of a checkpoint on a video folder")
    e.add_argument("--checkpoint", required=True, help="run directory (its best.pt) or checkpoint file")
    e.add_argument("--data", required=True)
    e.add_argument("--split", choices=["train", "val", "all"], default="val", help="(default: val)")
    e.add_argument("--clips", type=int, default=4, help="uniformly spaced clips per video (default: 4)")
    e.add_argument("--crops", type=int, choices=[1, 3], default=3, help="crops per clip (default: 3)")
    e.add_argument("--json", help="write the results here (default: RUN_DIR/eval-<split>.json)")
    e.add_argument("--device", default=default_device)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--on-error", choices=["skip", "raise"], default="skip")

    tb = sub.add_parser("tubes", help="each tube's grid, tokens, FLOPs per token and share of voxels for a clip size")
    tb.add_argument("--tubes", default="paper", help="a name (paper, compact) or kt,kh,kw/st,sh,sw/ot,oh,ow;...")
    tb.add_argument("--frames", type=int, default=32, help="(default: 32)")
    tb.add_argument("--size", type=int, default=224, help="(default: 224)")
    tb.add_argument("--dim", type=int, default=768, help="token width d, for the FLOPs (default: 768)")
    tb.add_argument("--plot", help="PNG of where the tubes sample a clip (needs matplotlib)")

    pl = sub.add_parser("plot", help="a PNG of a run's curves (RUN_DIR/metrics.jsonl; needs matplotlib)")
    pl.add_argument("run", help="run directory")
    pl.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")

    x = sub.add_parser("export", help="a run's checkpoint as a save_pretrained directory")
    x.add_argument("run", help="run directory (its best.pt) or checkpoint file")
    x.add_argument("dir", help="output directory (config.json + weights)")
    x.add_argument("--which", default="best.pt", help="checkpoint in the run directory (default: best.pt)")
    x.add_argument("--ema", action="store_true", help="the EMA weights (a run trained with --ema)")

    r = sub.add_parser("predict", help="top-k classes of video files")
    r.add_argument("--checkpoint", required=True, help="run directory (its best.pt) or checkpoint file")
    r.add_argument("files", nargs="+", help="video files")
    r.add_argument("--topk", type=int, default=5, help="(default: 5)")
    r.add_argument("--clips", type=int, default=4, help="(default: 4)")
    r.add_argument("--crops", type=int, choices=[1, 3], default=1, help="(default: 1)")
    r.add_argument("--device", default=default_device)
    return p


def _with_config(parser, argv):
    """argv parsed, with a train --config file's values as the defaults the command line overrides."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        cfg = load_config(args.config)
        sub = parser._subparsers._group_actions[0].choices[args.command]
        known = {a.dest for a in sub._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise SystemExit(f"{args.config}: unknown train options {unknown}")
        sub.set_defaults(**cfg)
        args = parser.parse_args(argv)
    return args


def load_config(path: str) -> dict:
    """A JSON (.json) or YAML (.yaml / .yml; needs PyYAML) file of train options, keys as the
    options' destinations (accum_steps) or names (accum-steps)."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write it as JSON") from None
        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: a config is a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


def main(argv=None):
    args = _with_config(_parser(), argv)
    warnings.simplefilter("default", UserWarning)
    try:
        return {"train": train, "eval": evaluate, "predict": predict, "export": export, "tubes": tubes,
                "plot": plot}[args.command](args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"tubevit {args.command}: {e}") from None


if __name__ == "__main__":
    main()
