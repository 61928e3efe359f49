"""What the compiler made of the CUDA kernels keeps its contracts (check_sass.py, run on the
built library without a GPU): no kernel uses more than 255 registers, the Hopper kernels use no
local memory (spills, stack arrays, parameters copied to local memory), the Hopper forward, dW and dP
kernels' sm_90a code issues wgmma (HGMMA), cp.async (LDGSTS), mbarrier operations (SYNCS) and the
async-proxy fence, within their register budget, and the dx writer stays in 85 registers without
local memory. Needs a CUDA build with the prototype and a cuobjdump (the toolkit's, or the copy
triton ships); skipped without them."""
import importlib.util
import json
import os

import pytest

import tubevit_ext as tv


def _check_sass():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "check_sass.py")
    spec = importlib.util.spec_from_file_location("check_sass", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    other = "void tubevit::tc::(anonymous namespace)::tube_tokens_tc_kernel<float>(float const*)"
    assert mod.check(dict(ok, sass=set(), stack=72), other) == []  # printed, not failed
    assert mod.check(dict(ok, regs=300), other) == ["300 registers > budget 255"]


def test_built_kernels_keep_their_contracts(tmp_path):
    if not (tv.cuda_compiled() and tv._C._prototype_compiled()):
        pytest.skip("a build without csrc/prototype")
    mod = _check_sass()
    if mod.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton)")
    out = tmp_path / "sass.json"
    rc = mod.main(["--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0, [r for r in rows if r["violations"]]
    assert len(rows) > 20
    hopper = [r for r in rows if "hopper::" in r["kernel"] and r["arch"] == "sm_90a"]
    mma = [r for r in hopper if any(k in r["kernel"] for k in ("forward_kernel", "dw_kernel<", "dp_kernel<"))]
    assert len(mma) == 6 and all(r["hgmma"] for r in mma)  # forward, dW and dP, bf16 and fp16
    assert len(hopper) == 8  # and the two dW reductions
