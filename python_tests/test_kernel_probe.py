"""bench/kernel_probe.py, the first thing bench/gpu_check.sh runs on a GPU: every probe through the
kernels' CPU emulators (the harness, one process per probe), the watchdog and the error path, and
the fingerprints of planted errors (a lane map that sends rows 8 places off, a product missing in
some columns, a doubled product in one channel tile, NaNs, dx chunks and uncovered voxels)."""
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest
import torch

import tubevit_ext as tv

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import kernel_probe as kp  # noqa: E402


def test_every_probe_passes_on_the_emulators(tmp_path):
    rc = kp.main(["--emulate", "--json", str(tmp_path / "p.json"), "--env", str(tmp_path / "p.env")])
    assert rc == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert [r["probe"] for r in res["probes"]] == list(kp.PROBES)
    assert all(r["status"] == "ok" for r in res["probes"]), res
    # every case ran for every probe (the writer: the flat case)
    for r in res["probes"]:
        assert set(r["cases"]) == {c[0] for c in kp.cases() if kp.case_applies(c[0], r["probe"])}
    assert {"odd", "flat-cl", "paper"} <= set(res["probes"][[r["probe"] for r in res["probes"]].index("mma-fwd")]["cases"])
    env = (tmp_path / "p.env").read_text().split()
    assert sorted(env) == ["PROBE_dx=ok", "PROBE_gemm=ok", "PROBE_hopper=ok", "PROBE_mma=ok"]


def test_a_probe_that_does_not_return_is_a_hang(tmp_path, monkeypatch):
    # a child that never returns, holding the pipes through a grandchild: the whole process group is
    # killed, so the probe returns (waiting for the pipes to close would take the sleep's 300 s)
    sleeper = tmp_path / "sleeper"
    sleeper.write_text("#!/bin/sh\nsleep 300\n")
    sleeper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(sleeper))
    t0 = time.monotonic()
    res = kp.run_probe("mma-fwd", True, timeout=1)
    assert res["status"] == "hang" and "1 s" in res["why"]
    assert time.monotonic() - t0 < 60


def test_routing_names_the_kernels_the_profiler_did_not_see():
    # the profiler's names of kernels in an anonymous namespace
    seen = ["void tubevit::hopper::(anonymous namespace)::dw_kernel<__nv_bfloat16>(tubevit::hopper::DwParams)",
            "void tubevit::hopper::(anonymous namespace)::dw_reduce_kernel<__nv_bfloat16>(float const*, int)"]
    assert kp.missing_kernels(kp.PROBES["hopper-dw"][2], seen) == []
    assert kp.missing_kernels(kp.PROBES["hopper-dx"][2], seen) == ["hopper::*dp_kernel", "tube_dx_writer"]
    assert kp.missing_kernels(("hopper::*dw_kernel",), seen[1:]) == ["hopper::*dw_kernel"]


def test_a_probe_that_raises_is_an_error(monkeypatch):
    monkeypatch.setitem(kp.PROBES, "bogus-fwd", ({}, "fwd", ()))  # the child process does not know it
    res = kp.run_probe("bogus-fwd", True, timeout=60)
    assert res["status"] == "error" and "KeyError" in res["why"], res
    assert kp.family_status([res, {"probe": "bogus-dw", "status": "wrong"}]) == {"bogus": "error"}
    assert kp.family_status([{"probe": "a-x", "status": "ok"}, {"probe": "a-y", "status": "hang"},
                             {"probe": "b-x", "status": "skipped"}]) == {"a": "hang", "b": "skipped"}


def _paper_forward():
    name, tubes, size, C, d, B, dtype = kp.cases()[1]
    x, ws, bs, pe, _ = kp.make_inputs(tubes, size, C, d, B, dtype)
    want = tv.reference.tube_tokens(x.double(), [w.double() for w in ws], [b.double() for b in bs], tubes,
                                    pe.double())
    base = torch.cat([b.double() + pe.double()[o:o + tv.num_tokens([t], size)]
                      for b, t, o in zip(bs, tubes, kp._offsets(tubes, size))]).unsqueeze(0)
    return tubes, size, d, B, dtype, want, base


def test_fingerprints_of_planted_forward_errors():
    tubes, size, d, B, dtype, want, base = _paper_forward()
    got = want.to(dtype)
    n = [tv.num_tokens([t], size) for t in tubes]
    off = kp._offsets(tubes, size)
    # tube 3: rows 0-23 of every 128-row tile rotated by 8 (row r holds row r + 8's result, rows
    # 16-23 rows 0-7's; rows are b * n + j)
    rows = got[:, off[3]:off[3] + n[3]].reshape(B * n[3], d).clone()
    for t0 in range(0, B * n[3], 128):
        rows[t0:t0 + 24] = torch.roll(rows[t0:t0 + 24].clone(), -8, dims=0)
    got[:, off[3]:off[3] + n[3]] = rows.view(B, n[3], d)
    # tube 0: the product doubled in the second channel tile
    s0 = slice(off[0], off[0] + n[0])
    got[:, s0, 128:] = (base[:, s0] + 2 * (want[:, s0] - base[:, s0]))[:, :, 128:].to(dtype)
    # tube 1: bias + position embedding only in channels 64-127
    s1 = slice(off[1], off[1] + n[1])
    got[:, s1, 64:128] = base[:, s1, 64:128].expand(B, -1, -1).to(dtype)
    got[0, off[2] + 1, 5] = float("nan")

    fp = kp.fingerprint_tokens(got, want, tubes, size, kp.tolerance(want, dtype), base)
    assert sorted(fp) == ["tube 0", "tube 1", "tube 2", "tube 3"]
    t0, t1, t2, t3 = (fp[f"tube {i}"] for i in range(4))
    assert t3["rows_in_tile"] == "0-23" and t3["row_map"] == {"8": 16, "-16": 8}
    assert t3["wrong"] > 0.9 * 24 * d * -(-B * n[3] // 128) - 1
    assert t0["col_tiles"] == "1" and t0["ratio"] == 2.0 and t0["product_missing"] == 0
    assert t1["cols_in_tile"] == "64-127" and t1["rows_in_tile"] == "all" and t1["ratio"] == 0.0
    assert t1["product_missing"] >= 0.99 * t1["wrong"]
    assert t2 == {**t2, "wrong": 1, "nan": 1}
    # nothing planted: nothing reported
    assert kp.fingerprint_tokens(want.to(dtype), want, tubes, size, kp.tolerance(want, dtype), base) == {}


def test_fingerprint_of_a_column_map():
    # a matrix whose columns 4-7 of each 128-column tile hold columns 0-3 (dW's patch columns)
    want = torch.randn(64, 300, dtype=torch.float64)
    got = want.clone()
    for c0 in range(0, 300, 128):
        got[:, c0 + 4:c0 + 8] = want[:, c0:c0 + 4]
    fp = kp.fingerprint_2d(got, want, 1e-6)
    assert fp["cols_in_tile"] == "4-7" and fp["rows_in_tile"] == "all" and fp["col_tiles"] == "all"
    assert fp["col_map"] == {"-4": 12} and fp["row_map"] == {"none": 32}


def test_fingerprint_of_planted_dx_errors():
    tubes = [tv.Tube((2, 4, 4), (2, 4, 4), (0, 0, 0)), tv.Tube((1, 2, 3), (2, 5, 6), (1, 1, 1))]
    size, C = (6, 13, 21), 2
    cover = kp.coverage(tubes, size, C)
    assert (cover == 0).any() and (cover >= 2).any()  # uncovered voxels and overlapping tubes
    want = torch.randn(2, C, *size, dtype=torch.float64) * (cover > 0)
    got = want.clone()
    got[..., 7::8] += 1  # one voxel of every 8-wide chunk
    fp = kp.fingerprint_dx(got, want, cover.expand_as(want), 1e-6)
    assert fp["w_mod_8"] == "7" and fp["samples"] == "all" and fp["channels"] == "all"
    got = want.clone()
    got[cover.expand_as(want) == 0] = 1.0  # uncovered voxels not written as zeros
    fp = kp.fingerprint_dx(got, want, cover.expand_as(want), 1e-6)
    assert fp["cover"] == "0" and fp["uncovered_nonzero"] == fp["wrong"] > 0


def test_ranges():
    assert kp.ranges([]) == "" and kp.ranges([3]) == "3"
    assert kp.ranges([7, 0, 1, 2, 9, 10, 12]) == "0-2,7,9-10,12"


@pytest.mark.skipif(not (torch.cuda.is_available() and tv.cuda_compiled()), reason="needs a CUDA GPU")
def test_cuda_default_paths_probe_ok():
    """On a GPU, the verified paths (GEMM path, the dx writer's control) pass their probes."""
    assert all(kp.run_probe(p, False, timeout=120)["status"] == "ok" for p in ("gemm-fwd", "gemm-bwd"))


GPU_CHECK = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.sh")


def _gpu_check(tmp_path, steps, probe_args):
    out = tmp_path / "out"
    # no GPU for the script even where there is one: its benchmark steps then fail at once, as here
    env = dict(os.environ, OUT=str(out), STEPS=steps, PY=sys.executable, PROBE_ARGS=probe_args, BUDGET_S="300",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", GPU_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with tarfile.open(out / "results.tar.gz") as t:
        results = {os.path.normpath(n) for n in t.getnames()}
    return sorted(os.listdir(out)), (out / "summary.txt").read_text(), results


def test_gpu_check_skips_the_steps_of_a_family_that_hung(tmp_path):
    """bench/gpu_check.sh on this machine with the probe's watchdog too short for any probe: every
    family hangs, so the mma and Hopper steps are skipped and their CUDA tests deselected; $OUT holds
    three files (the device tool brings back at most eight)."""
    files, summary, results = _gpu_check(tmp_path, "probe glimpse tests-mma sanitize-hopper ncu-hopper",
                                         "--emulate --timeout 0.5")
    assert files == ["logs.tar.gz", "results.tar.gz", "summary.txt"]
    assert "probe.json" in results
    assert "hopper-dw   HANG" in summary and "mma-fwd     HANG" in summary
    assert 'CUDA tests selected by -k "cuda and not cuda_mma and not cuda_hopper"' in summary
    for step in ("tests-mma", "sanitize-hopper", "ncu-hopper"):
        assert f"{step} SKIPPED: the" in summary
    assert "glimpse impls: reference unfold_gemm fused fused_tc\n" in summary  # no mma, no Hopper rows
    files, summary, _ = _gpu_check(tmp_path, "probe", "--emulate --probes mma-fwd hopper-fwd")
    assert "mma-fwd     OK" in summary and "hopper-fwd  OK" in summary and "CUDA tests selected" not in summary
    files, summary, _ = _gpu_check(tmp_path, "probe glimpse", "--emulate --probes mma-fwd")
    assert "glimpse impls: reference unfold_gemm fused fused_tc fused_mma fused_hopper\n" in summary


def test_gpu_check_writes_only_its_three_files():
    text = open(GPU_CHECK).read()
    named = set(re.findall(r'\$RES/([A-Za-z0-9_.${}%-]+)', text))
    assert named == {"summary.txt", "results.tar.gz", "logs.tar.gz"}, named


def test_reduction_maps_name_where_a_reduction_index_came_from(monkeypatch):
    # the emulated kernels: every patch column (forward) and token row (dW) maps to itself
    for family in ("mma", "hopper"):
        assert kp.reduction_maps(family, "fwd", True) == {"k_map": {}}
        assert kp.reduction_maps(family, "dw", True) == {"token_map": {}}
    assert kp.summarize_map({0: 8, 1: 9, 2: "zero", 3: 3, 4: "none", 5: 1}) == {
        "+8": "0-1", "zero": "2", "none": "4", "-4": "5"}
    # a forward whose k16 slices pair the wrong halves: patch columns 0-7 and 8-15 exchanged
    perm = torch.arange(64)
    perm[:16] = torch.cat([torch.arange(8, 16), torch.arange(8)])

    def fwd_swapped(family, emulate, x, ws, bs, tubes, pe):
        d = ws[0].shape[0]
        w = ws[0].reshape(d, -1)[:, perm].reshape(ws[0].shape)
        return tv.reference.tube_tokens(x.double(), [w.double()], None, tubes, None).to(x.dtype)
    monkeypatch.setattr(kp, "forward_call", fwd_swapped)
    assert kp.reduction_maps("mma", "fwd", True) == {"k_map": {"+8": "0-7", "-8": "8-15"}}

    # a weight gradient that pairs each gradient row with the next token's patch row
    def dw_shifted(family, emulate, grad, x, ws, tubes):
        g = torch.roll(grad.reshape(-1, grad.shape[-1]), 1, dims=0)
        eye = torch.eye(ws[0][0].numel(), dtype=torch.float64).view(-1, *ws[0].shape[1:])
        p = tv.reference.tube_tokens(x.double(), [eye], None, tubes, None).reshape(g.shape[0], -1)
        return [(g.double().t() @ p).reshape(ws[0].shape).to(x.dtype)]
    monkeypatch.setattr(kp, "weight_grad_call", dw_shifted)
    assert kp.reduction_maps("mma", "dw", True) == {"token_map": {"+1": "0-63"}}


def test_reduction_map_of_a_fragment_that_reads_one_half_twice(monkeypatch):
    # B fragments of every k16 slice taking their k from the first half for both halves: a one-hot
    # column in 0-7 is counted twice (with its partner 8 on), one in 8-15 never reaches the product
    src = torch.arange(64).view(4, 2, 8)
    src[:, 1] = src[:, 0]
    src = src.flatten()

    def fwd_half(family, emulate, x, ws, bs, tubes, pe):
        d = ws[0].shape[0]
        w = ws[0].reshape(d, -1)[:, src].reshape(ws[0].shape)  # column j of the product uses w[src[j]]
        return tv.reference.tube_tokens(x.double(), [w.double()], None, tubes, None).to(x.dtype)
    monkeypatch.setattr(kp, "forward_call", fwd_half)
    assert kp.reduction_maps("mma", "fwd", True) == {
        "k_map": {"sum(+0,+8)": "0-7,16-23,32-39,48-55", "zero": "8-15,24-31,40-47,56-63"}}
    assert kp.summarize_map({3: [3, 11], 4: "none"}) == {"sum(+0,+8)": "3", "none": "4"}


def test_reduction_map_per_row_class_of_an_a_fragment_bug(monkeypatch):
    # rows 0-7 of every 16 read patch column k - 8 where k is in an upper half of its k16 slice, rows
    # 8-15 read k + 8 where k is in a lower half (an A fragment whose lanes load the wrong half): no
    # single map holds for all rows, the per-row-class one does
    def fwd_rows(family, emulate, x, ws, bs, tubes, pe):
        d = ws[0].shape[0]
        eye = torch.eye(ws[0][0].numel(), dtype=torch.float64).view(-1, *ws[0].shape[1:])
        p = tv.reference.tube_tokens(x.double(), [eye], None, tubes, None)
        B, n, K = p.shape
        p = p.reshape(B * n, K)
        low = torch.arange(K).view(-1, 2, 8)[:, 0].flatten()
        src_top, src_bottom = torch.arange(K), torch.arange(K)
        src_top[low + 8] = low
        src_bottom[low] = low + 8
        rows = torch.arange(B * n) % 16
        out = torch.zeros(B * n, d, dtype=torch.float64)
        for src, sel in ((src_top, rows < 8), (src_bottom, rows >= 8)):
            out[sel] = p[sel][:, src] @ ws[0].reshape(d, K).double().t()
        return out.view(B, n, d).to(x.dtype)
    monkeypatch.setattr(kp, "forward_call", fwd_rows)
    res = kp.reduction_maps("mma", "fwd", True)
    assert res["k_map"] == {"none": "0-63"}
    assert res["k_map_by_row16"] == {"0-7": {"-8": "8-15,24-31,40-47,56-63"},
                                     "8-15": {"+8": "0-7,16-23,32-39,48-55"}}
