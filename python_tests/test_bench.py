"""The benchmark harness runs end to end on a tiny configuration and writes
the documented JSON format (speed is never asserted in tests)."""
import json
import os

import torch

from conftest import load_bench


def _bench():
    return load_bench("tube_bench")


def test_harness_json_format(tmp_path, capsys):
    out = tmp_path / "r.json"
    _bench().main(["--device", "cpu", "--batch", "1", "2", "--frames", "20", "--dim", "12", "--size", "32", "40",
                   "--tubes", "paper", "tubelet2", "--modes", "fwd", "fwd_bwd", "fwd_bwd_input",
                   "--impls", "reference", "unfold_gemm", "fused", "--dtypes", "float32", "--warmup", "1",
                   "--repeats", "2", "--rounds", "2", "--json", str(out), "--plot", str(tmp_path / "p.png")])
    r = json.loads(out.read_text())
    for key in ("device", "torch", "cuda", "cudnn", "commit", "peak_tflops", "results"):
        assert key in r
    assert len(r["results"]) == 2 * 2 * 3 * 3
    for row in r["results"]:
        assert row["impl"] in ("reference", "unfold_gemm", "compiled_reference", "fused")
        assert row["mode"] in ("fwd", "fwd_bwd", "fwd_bwd_input")
        for key, typ in (("dtype", str), ("batch", int), ("frames", int), ("dim", int), ("tubes", str),
                         ("median_ms", float), ("tflops", float), ("max_abs_err", float)):
            assert isinstance(row[key], typ), key
        assert row["agrees"], row
        assert row["samples"] == 4  # 2 interleaved rounds x 2 repeats
    assert "targets" in capsys.readouterr().out


def test_cuda_path_variants_pin_the_environment(tmp_path, monkeypatch):
    # fused_gemm / fused_tc / fused_hopper time the fused module with TUBEVIT_CUDA_PATH pinned for the whole
    # step and restore the caller's value after; off CUDA they are recorded as skipped
    bench = _bench()
    seen = []
    with bench.pinned_env({"TUBEVIT_CUDA_PATH": "gemm"}):
        seen.append(os.environ.get("TUBEVIT_CUDA_PATH"))
    seen.append(os.environ.get("TUBEVIT_CUDA_PATH"))
    assert seen == ["gemm", None]
    monkeypatch.setenv("TUBEVIT_CUDA_PATH", "tc")

    class ReadsEnv(torch.nn.Module):
        def forward(self, x):
            return os.environ["TUBEVIT_CUDA_PATH"]

    step = bench.make_step(ReadsEnv(), "fwd", {"TUBEVIT_CUDA_PATH": "gemm"})
    assert step(None) == "gemm" and os.environ["TUBEVIT_CUDA_PATH"] == "tc"
    out = tmp_path / "r.json"
    bench.main(["--device", "cpu", "--batch", "1", "--frames", "20", "--dim", "12", "--size", "32", "40",
                "--tubes", "paper", "--modes", "fwd", "--impls", "reference", "fused", "fused_gemm", "fused_tc", "fused_hopper",
                "--dtypes", "float32", "--warmup", "1", "--repeats", "1", "--json", str(out),
                "--plot", str(tmp_path / "p.png")])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert "median_ms" in rows["fused"]
    for impl in ("fused_gemm", "fused_tc", "fused_hopper"):
        assert "CUDA only" in rows[impl]["error"] and "median_ms" not in rows[impl]


def test_host_overhead_benchmark_rows(tmp_path):
    mod = load_bench("host_overhead")
    out = tmp_path / "h.json"
    rows = mod.main(["--calls", "20", "--rounds", "1", "--json", str(out)])
    assert [r["row"] for r in rows] == ["forward, no_grad", "forward, parameters require grad", "forward + backward"]
    assert all(r["tokenizer_us"] > 0 and r["linear_us"] > 0 for r in rows)
    assert json.load(open(out))["rows"][0]["ratio"] == rows[0]["ratio"]


def test_end_to_end_benchmark_rows(tmp_path):
    mod = load_bench("e2e_bench")
    out = tmp_path / "e.json"
    rows = mod.main(["--sizes", "ti", "--batch", "1", "--frames", "20", "--size", "28", "--repeats", "1",
                     "--device", "cpu", "--json", str(out), "--plot", str(tmp_path / "e.png")])
    assert [(r["impl"], r["mode"]) for r in rows] == [("reference", "train"), ("fused", "train"),
                                                       ("reference", "infer"), ("fused", "infer")]
    fused = [r for r in rows if r["impl"] == "fused"]
    assert all(r["median_ms"] > 0 and r["speedup"] > 0 and 0 <= r["tokenizer_share"] <= 1 for r in fused)
    saved = json.load(open(out))
    assert saved["rows"][1]["batch"] == 1 and saved["commit"]
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "e.png").stat().st_size > 1000
    except ImportError:
        pass
    # the comparison is of equal models: a reference whose tokenizer differs is refused before timing
    ours, ref = mod.build_pair("ti")
    with torch.no_grad():
        ref.tokenizer.tok.projs[0].weight.add_(torch.randn_like(ref.tokenizer.tok.projs[0].weight))
    x, y = torch.randn(1, 3, 20, 28, 28), torch.tensor([3])
    import pytest
    with pytest.raises(AssertionError):
        mod.check_same(ours, ref, x, y, None, torch.device("cpu"))


def test_pipelined_timing_counts_every_call():
    bench = _bench()
    calls = []
    t = bench.pipelined_seconds(lambda x: calls.append(x), [1, 2, 3], torch.device("cpu"), 7)
    assert t >= 0 and calls == [1] + [1, 2, 3, 1, 2, 3, 1]  # one untimed call, then 7 rotating


def test_cuda_rows_report_host_and_device_times(tmp_path):
    """On CUDA every row carries pipelined_ms and kernel_ms, and fwd rows with --cuda-graph the
    replayed graph's times; the kernels cannot take longer than the calls that launch them."""
    import pytest
    import tubevit_ext as tv
    if not (torch.cuda.is_available() and tv.cuda_compiled()):
        pytest.skip("needs a CUDA GPU and a CUDA build")
    out = tmp_path / "r.json"
    _bench().main(["--device", "cuda", "--batch", "1", "--frames", "20", "--dim", "64", "--size", "64", "64",
                   "--modes", "fwd", "fwd_bwd", "--impls", "reference", "fused", "--dtypes", "bfloat16",
                   "--warmup", "2", "--repeats", "5", "--cuda-graph", "--json", str(out),
                   "--plot", str(tmp_path / "p.png")])
    for row in json.loads(out.read_text())["results"]:
        assert "timing_error" not in row, row
        assert 0 < row["kernel_ms"] <= 1.05 * row["pipelined_ms"], row
        assert ("graph_ms" in row) == (row["mode"] == "fwd"), row


def test_cuda_targets_read_from_rows(capsys):
    # the fused kernels' target lines, judged from synthetic CUDA rows: ratios of pipelined_ms for the
    # library's choice and the forced Hopper path, the share of the matmul rate
    kw = dict(tubes="paper", batch=32, frames=32, dim=768)
    rows = [dict(impl=i, mode=m, dtype=d, median_ms=med, pipelined_ms=pipe, **kw) for i, m, d, med, pipe in [
        ("unfold_gemm", "fwd", "bfloat16", 0.30, 0.26), ("reference", "fwd", "bfloat16", 0.9, 0.9),
        ("fused", "fwd", "bfloat16", 0.20, 0.13), ("fused_hopper", "fwd", "bfloat16", 0.12, 0.08),
        ("unfold_gemm", "fwd_bwd_input", "bfloat16", 3.0, 2.8), ("fused_hopper", "fwd_bwd_input", "bfloat16", 1.0, 1.0),
        ("reference", "fwd", "float32", 4.0, 4.0), ("fused", "fwd", "float32", 0.5, 0.35)]]
    rows[3]["frac_of_matmul_peak"] = 0.30  # at the median; pipelined 0.12 / 0.08 x 0.30 = 45 %
    _bench().check_targets(rows, torch.device("cuda"))
    out = capsys.readouterr().out
    assert "bfloat16 fwd: fused_hopper vs unfold_gemm: 3.25x pipelined (target >= 2.5x) OK" in out
    assert "bfloat16 fwd: fused vs unfold_gemm: 2.00x pipelined (target >= 2.5x) MISSED" in out
    assert "bfloat16 fwd: fused_hopper vs reference: 11.25x pipelined (target >= 25.0x) MISSED" in out
    assert "bfloat16 fwd_bwd_input: fused_hopper vs unfold_gemm: 2.80x pipelined (target >= 2.0x) OK" in out
    assert "float32 fwd: fused vs reference: 11.43x pipelined (target >= 10.0x) OK" in out
    assert "bf16 fwd: fused_hopper achieved 45% of matmul peak pipelined (30% one call between events)" in out
    assert "fwd_bwd: fused_hopper" not in out  # no rows, no line
