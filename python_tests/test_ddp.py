"""DistributedDataParallel: 2 gloo processes on CPU train a few steps and
match single-process training on the full batch (the path for users who
outgrow one GPU)."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tubevit_ext.models import TubeViT

STEPS, BATCH = 3, 4


def _model():
    torch.manual_seed(0)
    return TubeViT(dim=24, depth=1, num_heads=2, mlp_dim=48, num_classes=3)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 3, 20, 32, 32, generator=g), torch.randint(0, 3, (STEPS, BATCH), generator=g)


def _train(model, xs, ys, wrap=lambda m: m):
    net = wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    xs, ys = _data()
    per = BATCH // world
    local_x, local_y = xs[:, rank * per:(rank + 1) * per], ys[:, rank * per:(rank + 1) * per]
    grads, params = _train(_model(), local_x, local_y, lambda m: torch.nn.parallel.DistributedDataParallel(m))
    if rank == 0:
        torch.save({"grads": grads, "params": params}, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_two_processes_match_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, init_file, out_file), nprocs=2, join=True)
        ddp = torch.load(out_file)
    xs, ys = _data()
    grads, params = _train(_model(), xs, ys)
    for step, (a, b) in enumerate(zip(ddp["grads"], grads)):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    for pa, pb in zip(ddp["params"], params):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
