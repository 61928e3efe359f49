"""Which of the CUDA kernels run, hang, raise or compute a wrong result — and, where wrong, where.

Each probe runs one kernel family's pass (forward, weight gradient, input gradient) on a few small
cases in its own process under a watchdog (--timeout, default 40 s), so a kernel that never returns
(an mbarrier pipeline that deadlocks) costs one probe, not the GPU run. A probe reports:
  ok        every case within two roundings of the output's dtype of the fp64 reference (on the same
            rounded operands), and the profiler saw the kernels the probe is about (routing)
  wrong     a result outside that bound, with a fingerprint of where (below)
  routing   right results, but the kernels the probe is about did not run (a fallback took the call)
  hang      the watchdog fired
  error     the call raised (CUDA errors: the message names the first one)
  skipped   this GPU or build cannot run the kernel (no sm_90a code, not an sm_90 GPU)
The fingerprint of a wrong result, per tube (forward and dW: the kernels' 128 x 128 tiles over the
tube's rows — tokens flattened across samples, or channels — and columns — channels, or patch
columns): the share of wrong elements, NaNs, zeros where the reference is not zero, results equal to
bias + position embedding alone (the product missing), which row and column classes inside a tile
and which tiles hold the wrong elements, the median ratio got/want of the product part, and for
wrong rows (columns) the offset to the row (column) of the same tile whose reference they match
(a fragment or ldmatrix lane map that sends a row to the wrong place shows as a constant offset).
Input gradients: by w % 8 (the dx writer's eight-voxel chunks), by the number of windows covering
the voxel (0: uncovered voxels must be written as zeros), by sample and channel. A wrong forward or
dW also gets a map of its reduction index (reduction_maps: one-hot weights or gradients on one case,
so each patch column or token row can be followed to where the kernel used it): offsets, sums of
several indices (a fragment that reads one k twice), zeros (an index that never reaches the product).

    python bench/kernel_probe.py [--probes NAME ...] [--json PATH] [--env PATH] [--timeout S] [--jobs N]
    python bench/kernel_probe.py --emulate   # the same cases through the kernels' CPU emulators

--env writes one line per kernel family, PROBE_<family>=<ok|wrong|hang|...> (the worst of its
probes), which bench/gpu_check.sh reads to skip the steps of a family that hung. --emulate runs
each probe's cases through the CPU emulation of the same tile code (torch.ops.tubevit_testing), so
the harness and its fingerprints run without a GPU (python_tests/test_kernel_probe.py).
Exit status 0 when no probe is wrong, hung or raised."""
from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time

import torch

import tubevit_ext as tv

TILE = 128  # rows and columns of a block tile in both the mma and the Hopper kernels

# name: (switches, pass, patterns of kernel names the profiler must see: fnmatch, '*' for any text,
# as between a namespace and a kernel in an anonymous namespace)
MMA = {"TUBEVIT_CUDA_PATH": "tc", "TUBEVIT_TC_MMA": "1"}
HOPPER = {"TUBEVIT_CUDA_PATH": "hopper"}
PROBES = {
    "gemm-fwd": ({"TUBEVIT_CUDA_PATH": "gemm"}, "fwd", ()),
    "gemm-bwd": ({"TUBEVIT_CUDA_PATH": "gemm"}, "bwd", ()),
    "gemm-dxw": ({"TUBEVIT_CUDA_PATH": "gemm", "TUBEVIT_DX_PASS": "writer"}, "dx", ("tube_dx_writer",)),
    "mma-fwd": (MMA, "fwd", ("tube_tokens_mma_kernel",)),
    "mma-dw": (MMA, "dw", ("tube_dw_mma_kernel", "tube_dw_mma_reduce_kernel")),
    "hopper-fwd": (HOPPER, "fwd", ("hopper::*forward_kernel",)),
    "hopper-dw": (HOPPER, "dw", ("hopper::*dw_kernel", "hopper::*dw_reduce_kernel")),
    "hopper-dx": (HOPPER, "dx", ("hopper::*dp_kernel", "tube_dx_writer")),
    "dx-writer": ({}, "writer", ("tube_dx_writer",)),
}
RANK = ["ok", "skipped", "routing", "wrong", "error", "hang"]  # worst last


def cases():
    """(name, tubes, (T, H, W), C, d, B, dtype): tiles that start inside a sample and a partial
    channel tile (flat), the paper's four tubes with several tiles each (paper), fp16, and x in
    channels_last_3d (a name ending in -cl: element-wide gathers, the Hopper producer's plain loads
    and proxy fence instead of cp.async), and odd d and K (the mma forward's element stores and
    one-element weight copies; forward probes of the families that take it, case_applies)."""
    flat = [tv.Tube((2, 4, 4), (2, 4, 4), (0, 0, 0))]
    return [
        ("flat", flat, (8, 20, 20), 2, 200, 3, torch.bfloat16),
        ("paper", list(tv.PAPER_TUBES), (32, 64, 64), 3, 256, 8, torch.bfloat16),
        ("flat-fp16", flat, (8, 20, 20), 2, 200, 3, torch.float16),
        ("flat-cl", flat, (8, 20, 20), 2, 200, 3, torch.bfloat16),
        ("odd", [tv.Tube((3, 3, 3), (2, 2, 2), (0, 1, 0))], (7, 12, 12), 3, 129, 3, torch.bfloat16),
    ]


def case_applies(case_name, probe):
    """Whether a probe runs a case: the odd case (d = 129) only where the kernel takes it (the GEMM
    path's and the mma forward; the Hopper kernels and the mma dW need d % 8 == 0), the dP -> dx
    writer on the flat case."""
    if probe == "dx-writer":
        return case_name == "flat"
    if case_name == "odd":
        return probe in ("gemm-fwd", "mma-fwd")
    return True


def make_inputs(tubes, size, C, d, B, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, *size, generator=g).to(dtype)
    ws = [(torch.randn(d, C, *t.kernel, generator=g) / (C * t.kernel[0] * t.kernel[1] * t.kernel[2]) ** 0.5).to(dtype)
          for t in tubes]
    bs = [torch.randn(d, generator=g).to(dtype) for _ in tubes]
    pe = tv.sincos_pos_embed(tubes, size, d, dtype=dtype)
    grad = torch.randn(B, tv.num_tokens(tubes, size), d, generator=g).to(dtype)
    return x, ws, bs, pe, grad


UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -20}


def tolerance(want, dtype):
    """The test suite's bound (python_tests/conftest.py check_rounded): two roundings of the output's
    dtype of max|want|, plus 1e-5."""
    return 2 * UNIT_ROUNDOFF[dtype] * (want.abs().max().item() if want.numel() else 0.0) + 1e-5


# ---------------------------------------------------------------- fingerprints

def ranges(idx):
    """Sorted ints as '0-7,16,20-23' ('' when empty)."""
    out, idx = [], sorted(int(i) for i in idx)
    for i in idx:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def _classes(bad, key, n, rel=0.5):
    """The values of key (one per element of bad) in [0, n) whose share of wrong elements is at least
    `rel` times the largest share of any value, as ranges; 'all' when every value present is one of them
    (an error confined to some columns then leaves every row class 'all', not a noisy subset)."""
    counts = torch.bincount(key, minlength=n).double()
    wrong = torch.bincount(key[bad], minlength=n).double() if bad.any() else torch.zeros(n, dtype=torch.float64)
    present = counts > 0
    share = torch.where(present, wrong / counts.clamp(min=1), torch.zeros_like(counts))
    hit = present & (share > 0) & (share >= rel * share.max())
    if hit.any() and bool((hit == present).all()) and int(present.sum()) > 1:
        return "all"
    return ranges(torch.nonzero(hit).flatten().tolist())


def _map_offsets(got, want, bad, tol, tile, limit=32):
    """For up to `limit` rows of got with wrong elements: the offset r' - r to the row r' of the same
    row tile whose reference matches row r on that row's wrong columns within tol (None: no row does).
    Returned as {offset: count}."""
    rows = torch.nonzero(bad.any(dim=1)).flatten().tolist()[:limit]
    found = {}
    for r in rows:
        cols = bad[r]
        t0 = (r // tile) * tile
        cand = want[t0:min(t0 + tile, want.shape[0])][:, cols]  # (tile rows, wrong cols)
        dist = (cand - got[r, cols].unsqueeze(0)).abs().amax(dim=1)
        best = int(torch.argmin(dist))
        key = str(t0 + best - r) if dist[best].item() <= tol else "none"
        found[key] = found.get(key, 0) + 1
    return found


def fingerprint_2d(got, want, tol, base=None, row_tile=TILE, col_tile=TILE):
    """Where got (2-D) differs from want (2-D, fp64) by more than tol, in the kernels' tile
    coordinates. base: what the output holds without the product (bias + position embedding)."""
    got, want = got.double(), want.double()
    R, Ccols = want.shape
    diff = (got - want).abs()
    bad = ~(diff <= tol)  # NaN counts as wrong
    fp = {"wrong": int(bad.sum()), "of": bad.numel()}
    if not fp["wrong"]:
        return fp
    fp["nan"] = int((~torch.isfinite(got)).sum())
    fp["zero"] = int((bad & (got == 0) & (want != 0)).sum())
    rows = torch.arange(R).unsqueeze(1).expand(R, Ccols)
    cols = torch.arange(Ccols).unsqueeze(0).expand(R, Ccols)
    fp["rows_in_tile"] = _classes(bad.flatten(), (rows % row_tile).flatten(), row_tile)
    fp["cols_in_tile"] = _classes(bad.flatten(), (cols % col_tile).flatten(), col_tile)
    # a partial last tile has fewer elements, so its share of a per-tile pattern is larger: 0.25
    fp["row_tiles"] = _classes(bad.flatten(), (rows // row_tile).flatten(), -(-R // row_tile), 0.25)
    fp["col_tiles"] = _classes(bad.flatten(), (cols // col_tile).flatten(), -(-Ccols // col_tile), 0.25)
    prod_got, prod_want = got, want
    if base is not None:
        base = base.double().expand_as(want)
        fp["product_missing"] = int((bad & ((got - base).abs() <= tol) & ((want - base).abs() > tol)).sum())
        prod_got, prod_want = got - base, want - base
    sel = bad & torch.isfinite(got) & (prod_want.abs() > 4 * tol)
    if sel.any():
        fp["ratio"] = round(float((prod_got[sel] / prod_want[sel]).median()), 4)
    finite = torch.where(torch.isfinite(got), got, torch.full_like(got, float("inf")))
    fp["row_map"] = _map_offsets(finite, want, bad, tol, row_tile)
    fp["col_map"] = _map_offsets(finite.t(), want.t(), bad.t(), tol, col_tile)
    return fp


def fingerprint_tokens(got, want, tubes, size, tol, base=None):
    """Forward output (B, N, d): one 2-D fingerprint per tube, rows = the tube's tokens flattened
    across samples (row b * n_i + j), columns = channels; only the tubes with wrong elements."""
    B, _, d = want.shape
    out, off = {}, 0
    for i, t in enumerate(tubes):
        n = tv.num_tokens([t], size)
        as2d = lambda y: y[:, off:off + n, :].reshape(B * n, d)
        fp = fingerprint_2d(as2d(got), as2d(want), tol, None if base is None else as2d(base.expand_as(want)))
        if fp["wrong"]:
            out[f"tube {i}"] = fp
        off += n
    return out


def fingerprint_dx(got, want, cover, tol):
    """Input gradient (B, C, T, H, W); cover: how many windows of all tubes hold each voxel."""
    got, want = got.double(), want.double()
    bad = ~((got - want).abs() <= tol)
    fp = {"wrong": int(bad.sum()), "of": bad.numel()}
    if not fp["wrong"]:
        return fp
    B, C, T, H, W = want.shape
    idx = lambda dim, n: torch.arange(n).view([n if k == dim else 1 for k in range(5)]).expand(want.shape).flatten()
    flat = bad.flatten()
    fp["nan"] = int((~torch.isfinite(got)).sum())
    fp["zero"] = int((bad & (got == 0) & (want != 0)).sum())
    fp["uncovered_nonzero"] = int((bad & (cover == 0)).sum())
    fp["w_mod_8"] = _classes(flat, idx(4, W) % 8, 8)
    fp["cover"] = _classes(flat, cover.clamp(max=8).flatten().long(), 9)
    fp["samples"] = _classes(flat, idx(0, B), B)
    fp["channels"] = _classes(flat, idx(1, C), C)
    fp["t"] = _classes(flat, idx(2, T), T)
    return fp


def coverage(tubes, size, C):
    """(1, C, T, H, W) fp64: the number of (tube, window) pairs holding each voxel."""
    x = torch.zeros(1, C, *size, dtype=torch.float64, requires_grad=True)
    ws = [torch.ones(1, C, *t.kernel, dtype=torch.float64) for t in tubes]
    tv.reference.tube_tokens(x, ws, None, tubes, None).sum().backward()
    return x.grad.round()


# ---------------------------------------------------------------- one probe (in its own process)

def reference_grads(x, ws, bs, tubes, pe, grad):
    xd = x.double().requires_grad_()
    wd = [w.double().requires_grad_() for w in ws]
    bd = [b.double().requires_grad_() for b in bs]
    y = tv.reference.tube_tokens(xd, wd, bd, tubes, pe.double())
    (y * grad.double()).sum().backward()
    return xd.grad, [w.grad for w in wd], [b.grad for b in bd]


def kernels_seen(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def forward_call(family, emulate, x, ws, bs, tubes, pe):
    """The family's forward on CPU tensors (emulated) or their CUDA copies; the result on the CPU."""
    from tubevit_ext.testing import ops
    if emulate:
        emu = {"gemm": ops.tube_tokens_gemm_path, "mma": ops.tube_tokens_mma_emulated,
               "hopper": ops.tube_tokens_hopper_emulated}[family]
        return emu(x, ws, bs or [], tv.flatten_tubes(tubes), pe)
    c = lambda t: None if t is None else t.cuda()
    return tv.tube_tokens(c(x), [c(w) for w in ws], [c(b) for b in bs] or None, tubes, c(pe)).cpu()


def weight_grad_call(family, emulate, grad, x, ws, tubes):
    """The family's dW list (emulated, or the CUDA backward op with only dW asked), on the CPU."""
    from tubevit_ext.testing import ops
    flat = tv.flatten_tubes(tubes)
    if emulate:
        if family == "mma":
            return list(ops.tube_tokens_mma_emulated_dw(grad, x, ws, flat, 528))
        if family == "hopper":
            return list(ops.tube_tokens_hopper_dw_emulated(grad, x, ws, flat, False)[0])
        return list(ops.tube_tokens_gemm_path_dw(grad, x, ws, flat))
    dws = torch.ops.tubevit.tube_tokens_backward(grad.cuda(), x.cuda(), [w.cuda() for w in ws], [], flat,
                                                 [False, True, False])[1]
    return [w.cpu() for w in dws]


def _index_map(got, candidates, tol):
    """got (n,) against the columns of candidates (n, m): the index of the column got equals within tol;
    else 'zero' where got is zero; else the list of (at most 4) columns whose plain sum got is, within
    a 16-bit rounding (a fragment that reads one k twice and another never); else 'none'."""
    dist = (candidates - got.unsqueeze(1)).abs().amax(dim=0)
    best = int(torch.argmin(dist))
    if dist[best].item() <= tol:
        return best
    if bool((got == 0).all()):
        return "zero"
    coef = torch.linalg.lstsq(candidates, got.unsqueeze(1)).solution.flatten()
    src = torch.nonzero(coef.abs() > 0.5).flatten().tolist()
    if 1 < len(src) <= 4:
        err = (candidates[:, src].sum(dim=1) - got).abs().max().item()
        if err <= 2.0 ** -7 * got.abs().max().item() + tol:
            return src
    return "none"


def summarize_map(mapping):
    """{i: j, [j1, j2], 'zero' or 'none'} -> {'+8': '0-7', 'sum(+0,+8)': '16-23', 'zero': '24-31', ...}:
    the indices whose result came from another index (or a sum of several), grouped by offset; {} when
    every index maps to itself."""
    groups = {}
    for i, j in mapping.items():
        if isinstance(j, str):
            key = j
        elif isinstance(j, list):
            key = "sum(" + ",".join(f"{s - i:+d}" for s in j) + ")"
        else:
            key = f"{j - i:+d}"
        if key != "+0":
            groups.setdefault(key, []).append(i)
    return {k: ranges(v) for k, v in groups.items()}


def reduction_maps(family, kind, emulate):
    """Where a wrong result's reduction index comes from, on the flat case (K = 64 patch columns, 300
    token rows). Forward: with W_i one-hot in patch column k (every channel), each token's output
    must equal its patch entry k; the column k' it equals instead is recorded (a k-fragment or stage
    mix-up shows as offsets). dW: with G one-hot in token row r, dW's channel 0 must equal patch row
    r; the row r' it equals instead is recorded (the first 64 rows: the first K steps)."""
    _, tubes, size, C, d, B, dtype = cases()[0]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, C, *size, generator=g).to(dtype)
    t = tubes[0]
    K = C * t.kernel[0] * t.kernel[1] * t.kernel[2]
    eye = torch.eye(K, dtype=torch.float64).view(K, C, *t.kernel)
    patches = tv.reference.tube_tokens(x.double(), [eye], None, tubes, None)  # (B, n, K)
    n = patches.shape[1]
    flat_p = patches.reshape(B * n, K)
    tol = 1e-6 * max(1.0, flat_p.abs().max().item())
    mapping = {}
    if kind == "fwd":
        outs = []
        for k in range(K):
            w = torch.zeros(d, K, dtype=dtype)
            w[:, k] = 1
            y = forward_call(family, emulate, x, [w.view(d, C, *t.kernel)], [], tubes, None)
            outs.append(y[..., 0].reshape(B * n).double())
            mapping[k] = _index_map(outs[-1], flat_p, tol)
        res = {"k_map": summarize_map(mapping)}
        if "none" in mapping.values():
            # rows that take their k from different places (an A fragment's per-lane rows): the map
            # per class of rows mod 16 (a fragment's rows), classes with the same map together
            same = {}
            for g16 in range(16):
                rows = torch.arange(g16, B * n, 16)
                m = summarize_map({k: _index_map(o[rows], flat_p[rows], tol) for k, o in enumerate(outs)})
                if m:
                    same.setdefault(json.dumps(m, sort_keys=True), []).append(g16)
            res["k_map_by_row16"] = {ranges(g): json.loads(m) for m, g in same.items()}
        return res
    for r in range(min(64, B * n)):
        grad = torch.zeros(B * n, d, dtype=dtype)
        grad[r] = 1
        w0 = torch.zeros(d, C, *t.kernel, dtype=dtype)
        dw = weight_grad_call(family, emulate, grad.view(B, n, d), x, [w0], tubes)[0]
        mapping[r] = _index_map(dw.reshape(d, K)[0].double(), flat_p.t(), tol)
    return {"token_map": summarize_map(mapping)}


def run_pass(kind, case, emulate):
    """Computes the probe's pass on one case: (dict of name -> (got, want, fingerprint kind, extra),
    kernel names seen or None under emulation)."""
    from tubevit_ext.testing import ops
    name, tubes, size, C, d, B, dtype = case
    x, ws, bs, pe, grad = make_inputs(tubes, size, C, d, B, dtype)
    if name.endswith("-cl"):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    flat = tv.flatten_tubes(tubes)
    family = kind[0]
    dev = (lambda t: t) if emulate else (lambda t: t.cuda())
    xc, wc, bc, pc, gc = dev(x), [dev(w) for w in ws], [dev(b) for b in bs], dev(pe), dev(grad)
    results = {}
    if kind[1] == "fwd":
        if emulate:
            got, names = forward_call(family, True, x, ws, bs, tubes, pe), None
        else:
            got, names = kernels_seen(lambda: tv.tube_tokens(xc, wc, bc, tubes, pc))
        want = tv.reference.tube_tokens(x.double(), [w.double() for w in ws], [b.double() for b in bs], tubes,
                                        pe.double())
        base = torch.cat([(b.double() + pe.double()[off:off + tv.num_tokens([t], size)])
                          for b, t, off in zip(bs, tubes, _offsets(tubes, size))]).unsqueeze(0)
        results["y"] = (got.cpu(), want, "tokens", base)
        return results, names
    if kind[1] == "writer":
        elems = sum(B * tv.num_tokens([t], size) * C * t.kernel[0] * t.kernel[1] * t.kernel[2] for t in tubes)
        dp = torch.randn(elems, generator=torch.Generator().manual_seed(3))
        want = ops.dx_from_dp(grad, x, ws, flat, dp, 0).double()  # the gather's CPU emulation
        if emulate:
            got, names = ops.dx_from_dp(grad, x, ws, flat, dp, 2), None
        else:
            got, names = kernels_seen(lambda: ops.dx_from_dp(gc, xc, wc, flat, dev(dp), 2))
        results["dx"] = (got.cpu(), want, "dx", None)
        return results, names
    dx_w, dw_w, db_w = reference_grads(x, ws, bs, tubes, pe, grad)
    mask = {"dw": [False, True, True], "dx": [True, False, False], "bwd": [True, True, True]}[kind[1]]
    if emulate:
        names = None
        dx, dws, dbs = None, None, None
        if family == "gemm" and kind[1] == "dx":  # dP as cuBLAS makes it (fp32), then the writer
            offs, dp = _offsets(tubes, size), []
            for w, t, o in zip(ws, tubes, offs):
                n = tv.num_tokens([t], size)
                dp.append((grad[:, o:o + n].reshape(B * n, d).float() @ w.float().reshape(d, -1)).flatten())
            dx = ops.dx_from_dp(grad, x, ws, flat, torch.cat(dp), 2)
        elif family in ("gemm", "mma"):  # the GEMM path also gives dx (its per-tube scatter)
            dws = weight_grad_call(family, True, grad, x, ws, tubes)
            dx = ops.tube_tokens_gemm_path_dx(grad, x, ws, flat) if family == "gemm" else None
        elif kind[1] == "dw":
            dws, dbs = ops.tube_tokens_hopper_dw_emulated(grad, x, ws, flat, True)
        else:
            dx = ops.tube_tokens_hopper_dx_emulated(grad, x, ws, flat)
    else:
        (dx, dws, dbs), names = kernels_seen(
            lambda: torch.ops.tubevit.tube_tokens_backward(gc, xc, wc, [], flat, mask))
    if mask[0] and dx is not None:
        results["dx"] = (dx.cpu(), dx_w, "dx", None)
    if mask[1]:
        for i, (g, w) in enumerate(zip(dws or [], dw_w)):
            results[f"dW[{i}]"] = (g.cpu().reshape(d, -1), w.reshape(d, -1), "2d", None)
    if mask[2]:
        for i, (g, w) in enumerate(zip(dbs or [], db_w)):
            results[f"db[{i}]"] = (g.cpu().reshape(1, d), w.reshape(1, d), "2d", None)
    return results, names


def _offsets(tubes, size):
    off, out = 0, []
    for t in tubes:
        out.append(off)
        off += tv.num_tokens([t], size)
    return out


def available(name, emulate):
    """None when the probe can run here, else why not."""
    if emulate:
        return None
    if not (torch.cuda.is_available() and tv.cuda_compiled()):
        return "no CUDA GPU or a build without the CUDA kernels"
    if name.startswith("hopper") and not (tv._C._hopper_compiled() and torch.cuda.get_device_capability() == (9, 0)):
        return "needs an sm_90 GPU and a build with the Hopper kernels"
    if name.startswith("mma") and torch.cuda.get_device_capability() < (8, 0):
        return "needs sm_80 or newer"
    return None


def missing_kernels(wanted, seen):
    """The entries of wanted (fnmatch patterns inside kernel names) that no name in seen matches."""
    return [k for k in wanted if not any(fnmatch.fnmatchcase(n, f"*{k}*") for n in seen)]


def probe_one(name, emulate):
    """Runs in the child process: every case of one probe, one JSON object."""
    _, kind, want_names = PROBES[name]
    why = available(name, emulate)
    if why:
        return {"probe": name, "status": "skipped", "why": why}
    out = {"probe": name, "status": "ok", "cases": {}}
    seen = set()
    for case in cases():
        if not case_applies(case[0], name):
            continue
        t0 = time.perf_counter()
        results, names = run_pass((name.split("-")[0], kind), case, emulate)
        seen.update(names or [])
        rec = {"s": round(time.perf_counter() - t0, 2)}
        for key, (got, want, how, extra) in results.items():
            tol = tolerance(want, case[6])
            if how == "tokens":
                fp = fingerprint_tokens(got, want, case[1], case[2], tol, extra)
            elif how == "dx":
                fp = fingerprint_dx(got, want, coverage(case[1], case[2], case[3]).expand_as(want), tol)
                fp = fp if fp["wrong"] else {}
            else:
                fp = fingerprint_2d(got, want, tol)
                fp = fp if fp["wrong"] else {}
            if fp:
                rec[key] = fp
                out["status"] = "wrong"
        out["cases"][case[0]] = rec
    if out["status"] == "wrong" and kind in ("fwd", "dw"):
        out.update(reduction_maps(name.split("-")[0], kind, emulate))
    if not emulate:
        out["kernels"] = sorted(seen)
        missing = missing_kernels(want_names, seen)
        if missing and out["status"] == "ok":
            out["status"] = "routing"
            out["why"] = f"the profiler saw none of {missing}"
    return out


# ---------------------------------------------------------------- the parent: one process per probe

def run_probe(name, emulate, timeout):
    env = dict(os.environ)
    if emulate:
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.update(PROBES[name][0])
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name] + (["--emulate"] if emulate else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"probe": name, "status": "hang", "why": f"no result within {timeout:g} s", "s": timeout}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in stderr.splitlines() if ln.strip()]
        first_cuda = next((ln for ln in err if "CUDA error" in ln or "cudaError" in ln), None)
        return {"probe": name, "status": "error", "rc": proc.returncode,
                "why": (first_cuda or (err[-1] if err else "no output"))[:400], "tail": err[-12:],
                "s": round(time.perf_counter() - t0, 1)}
    res = json.loads(lines[-1])
    res["s"] = round(time.perf_counter() - t0, 1)
    return res


def describe(res):
    """One line per probe, then one per wrong output."""
    head = f"{res['probe']:<11} {res['status'].upper():<8} {res.get('s', '')}s"
    if res.get("why"):
        head += f"  {res['why']}"
    lines = [head]
    for case, rec in res.get("cases", {}).items():
        for key, fp in rec.items():
            if key == "s":
                continue
            parts = fp.items() if "wrong" not in fp else [("", fp)]
            for sub, f in parts:
                text = ", ".join(f"{k}={v}" for k, v in f.items())
                lines.append(f"    {case} {key} {sub}: {text}".replace("  :", ":").replace(" :", ":"))
    for key in ("k_map", "k_map_by_row16", "token_map"):
        if key in res:
            lines.append(f"    {key} (flat case; index: offset of the index its result came from): "
                         f"{res[key] or 'every index its own'}")
    return lines


def family_status(results):
    fam = {}
    for r in results:
        f = r["probe"].split("-")[0]
        prev = fam.get(f, "ok")
        fam[f] = r["status"] if RANK.index(r["status"]) > RANK.index(prev) else prev
    return fam


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probes", nargs="*", default=list(PROBES), choices=list(PROBES))
    ap.add_argument("--timeout", type=float, default=40.0, help="seconds per probe before it counts as hung")
    ap.add_argument("--jobs", type=int, default=4, help="probes run at once")
    ap.add_argument("--emulate", action="store_true", help="the kernels' CPU emulators instead of the GPU")
    ap.add_argument("--json", help="write every probe's result here")
    ap.add_argument("--env", help="write PROBE_<family>=<status> lines here (for bench/gpu_check.sh)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(probe_one(args.one, args.emulate)))
        return 0
    # the probes run side by side (one GPU takes several processes; a hung kernel holds only its own)
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_probe, name, args.emulate, args.timeout) for name in args.probes]
        results = []
        for fut in futures:
            results.append(fut.result())
            print("\n".join(describe(results[-1])), flush=True)
    fam = family_status(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "emulate": args.emulate, "families": fam, "probes": results}, f,
                      indent=1)
    if args.env:
        with open(args.env, "w") as f:
            f.write("".join(f"PROBE_{k}={v}\n" for k, v in fam.items()))
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
