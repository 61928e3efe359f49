"""FSDP2 (torch.distributed.fsdp.fully_shard): 2 gloo processes on CPU train a sharded TubeViT
through its own call path (so FSDP2's hooks run, joint image + video batches included) and end
with the parameters of single-process training on the whole batch: video batches and joint
batches, image-to-video scaling on and off, gradient checkpointing on."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tubevit_ext as tv
from tubevit_ext.models import TubeViT, losses_by_head

fsdp = pytest.importorskip("torch.distributed.fsdp")
STEPS, PER_RANK, WORLD = 2, 2, 2
TUBES = [tv.Tube((4, 8, 8), (4, 8, 8)), tv.Tube((8, 4, 4), (8, 8, 8), (0, 2, 2)), tv.Tube((1, 8, 8), (8, 8, 8))]
CONFIGS = {"video": dict(joint=False, scaling=False, ckpt=False),
           "joint+scaling": dict(joint=True, scaling=True, ckpt=False),
           "joint+scaling+checkpointing": dict(joint=True, scaling=True, ckpt=True)}


def _model(cfg):
    torch.manual_seed(0)
    m = TubeViT(dim=24, depth=3, num_heads=2, mlp_dim=48, num_classes={"video": 3, "image": 4}, tubes=TUBES).double()
    if cfg["scaling"]:
        m.enable_image_to_video_scaling(1)
        with torch.no_grad():
            m.blocks[1].gate_alpha.fill_(0.3)
    if cfg["ckpt"]:
        m.set_grad_checkpointing()
    return m


def _batch(step, rank, cfg):
    """Rank `rank`'s share of step `step`: PER_RANK videos (and as many images when joint), so
    every rank holds the same number of samples per head."""
    g = torch.Generator().manual_seed(100 * step + rank)
    samples = [torch.randn(3, 8, 32, 32, generator=g, dtype=torch.float64) for _ in range(PER_RANK)]
    heads, labels = ["video"] * PER_RANK, torch.randint(0, 3, (PER_RANK,), generator=g).tolist()
    if cfg["joint"]:
        samples += [torch.randn(3, 24, 32, generator=g, dtype=torch.float64) for _ in range(PER_RANK)]
        heads += ["image"] * PER_RANK
        labels += torch.randint(0, 4, (PER_RANK,), generator=g).tolist()
    return samples, heads, labels


def _step(model, opt, samples, heads, labels):
    loss, _ = losses_by_head(model(samples, head=heads), heads, labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _worker(rank, world, init_file, out_file, name):
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = CONFIGS[name]
    model = _model(cfg)
    for blk in model.blocks:
        fully_shard(blk)
    fully_shard(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(STEPS):
        _step(model, opt, *_batch(step, rank, cfg))
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, out_file)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter teardown: a worker aborted now and then while tearing down, after
    # destroy_process_group ("terminate called without an active exception", about one run in 25
    # of this file on the 2-core VM); the training this test checks is complete and saved by then.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fsdp2_two_processes_match_single_process(name):
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(WORLD, init_file, out_file, name), nprocs=WORLD, join=True)
        sharded = torch.load(out_file)
    cfg = CONFIGS[name]
    model = _model(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(STEPS):
        parts = [_batch(step, r, cfg) for r in range(WORLD)]
        # the whole batch, grouped like the ranks' shares so each head's mean is the same
        samples = [s for p in parts for s in p[0]]
        heads = [h for p in parts for h in p[1]]
        labels = [y for p in parts for y in p[2]]
        _step(model, opt, samples, heads, labels)
    single = model.state_dict()
    assert sharded.keys() == single.keys()
    moved = 0
    for k, v in single.items():
        torch.testing.assert_close(sharded[k], v, rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(v, _model(cfg).state_dict()[k]))
    assert moved > 10  # training changed the parameters it compares
    if cfg["scaling"]:
        assert sharded["blocks.1.gate_alpha"].shape == (1,)
