"""What the compiler made of the CUDA kernels keeps its contracts (bench/check_sass.py, run on the
built library without a GPU): no kernel uses more than 255 registers, the Hopper kernels use no
local memory (spills, stack arrays, parameters copied to local memory), the Hopper forward, dW and dP
kernels' sm_90a code issues wgmma (HGMMA), cp.async (LDGSTS), mbarrier operations (SYNCS) and the
async-proxy fence, within their register budget, the dx writer stays in 85 registers without
local memory, and the ldmatrix + mma.sync forward and dW have LDSM, HMMA and LDGSTS and no local
memory on every arch built. Needs a CUDA build and a cuobjdump (the toolkit's, or the copy
triton ships); skipped without them."""
import json

import pytest

import tubevit_ext as tv
from conftest import load_bench


def _check_sass():
    return load_bench("check_sass")


def test_the_checks_catch_what_they_name():
    mod = _check_sass()
    ok = dict(arch="sm_90a", regs=154, stack=0, local=0, shared=0,
              sass={"HGMMA.64x128x16.F32.BF16", "LDGSTS.E.BYPASS.128.ZFILL", "SYNCS.PHASECHK.TRANS64.TRYWAIT",
                    "FENCE.VIEW.ASYNC.S"})
    name = "void tubevit::hopper::(anonymous namespace)::forward_kernel<cutlass::bfloat16_t>(tubevit::hopper::Params)"
    assert mod.check(ok, name) == []
    assert mod.check(dict(ok, local=16), name) == ["local memory (LOCAL 16, STACK 0)"]
    assert mod.check(dict(ok, regs=170), name) == ["170 registers > budget 168"]
    assert mod.check(dict(ok, sass=ok["sass"] - {"HGMMA.64x128x16.F32.BF16"}), name) == ["no HGMMA"]
    assert mod.check(dict(ok, sass=ok["sass"] - {"LDGSTS.E.BYPASS.128.ZFILL"}), name) == ["no LDGSTS"]
    assert mod.check(dict(ok, sass={"HGMMA.64x128x16.F32.BF16"}), name) == ["no LDGSTS", "no SYNCS",
                                                                          "no FENCE.VIEW.ASYNC.S"]
    assert mod.check(dict(ok, sass=set(), arch="sm_80"), name) == []  # no wgmma before sm_90a
    writer = "void tubevit::dx::(anonymous namespace)::tube_dx_writer_kernel<float>(float const*, float*)"
    assert mod.check(dict(ok, regs=76, sass=set()), writer) == []
    assert mod.check(dict(ok, regs=90, sass=set(), stack=16), writer) == ["local memory (LOCAL 0, STACK 16)",
                                                                        "90 registers > budget 85"]
    mma = "void tubevit::mma::(anonymous namespace)::tube_tokens_mma_kernel<c10::BFloat16>(c10::BFloat16 const*)"
    fine = dict(ok, arch="sm_80", regs=128, sass={"LDSM.16.M88.4", "HMMA.16816.F32.BF16", "LDGSTS.E.128"})
    assert mod.check(fine, mma) == []
    assert mod.check(dict(fine, sass=fine["sass"] - {"LDSM.16.M88.4"}), mma) == ["no LDSM"]  # on sm_80 too
    assert mod.check(dict(fine, stack=48), mma) == ["local memory (LOCAL 0, STACK 48)"]
    other = "void tubevit::tc::(anonymous namespace)::tube_tokens_tc_kernel<float>(float const*)"
    assert mod.check(dict(ok, sass=set(), stack=72), other) == []  # printed, not failed
    assert mod.check(dict(ok, regs=300), other) == ["300 registers > budget 255"]


def test_built_kernels_keep_their_contracts(tmp_path):
    if not tv.cuda_compiled():
        pytest.skip("a CPU-only build has no CUDA kernels")
    mod = _check_sass()
    if mod.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton)")
    out = tmp_path / "sass.json"
    rc = mod.main(["--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0, [r for r in rows if r["violations"]]
    assert len(rows) > 20
    if tv._C._hopper_compiled():
        hopper = [r for r in rows if "hopper::" in r["kernel"] and r["arch"] == "sm_90a"]
        mma = [r for r in hopper if any(k in r["kernel"] for k in ("forward_kernel", "dw_kernel<", "dp_kernel<"))]
        assert len(mma) == 6 and all(r["hgmma"] for r in mma)  # forward, dW and dP, bf16 and fp16
        assert len(hopper) == 8  # and the two dW reductions
    for name in ("tube_tokens_mma_kernel", "tube_dw_mma_kernel"):
        mma_rows = [r for r in rows if name in r["kernel"]]
        assert mma_rows and len(mma_rows) % 2 == 0, name  # fp16 and bf16 on every arch built
