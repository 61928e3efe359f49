"""What the compiler made of the CUDA kernels, checked without a GPU: reads the built library's
resource report and SASS (cuobjdump) and fails when a kernel breaks its contract.

    python csrc/prototype/check_sass.py [--lib tubevit_ext/_C....so] [--cuobjdump PATH] [--json out.json]

Contracts (per kernel, matched on the demangled name):
  every kernel          at most 255 registers; its local memory (LOCAL, STACK) is printed
  hopper:: kernels      no local memory (LOCAL and STACK 0: no spills, no stack arrays, no kernel
                        parameters copied to local memory); the forward, dW and dP kernels' sm_90a code has
                        HGMMA (wgmma), LDGSTS (cp.async: the producer's gather), SYNCS (mbarrier
                        waits and arrivals: the stage pipeline) and FENCE.VIEW.ASYNC.S (the proxy
                        fence after the 1-element chunks' plain shared stores), within 168
                        registers (384 threads, one CTA per SM: 65536 / 384)
  dx writer             no local memory, at most 85 registers (three 256-thread blocks per SM)
(The WMMA tensor-core kernels of cuda/tube_tokens_tc.cu keep stage-pointer tables on the stack, 24-192
bytes: printed, not failed.)
cuobjdump comes with the CUDA toolkit; without one, the copy that triton (a torch dependency) ships is
used. Prints one line per kernel and exits 1 on a violation, 2 when it cannot run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name pattern -> (SASS mnemonics its code must contain, register budget, no local memory, the archs the
# mnemonics are required on: "sm_90a" for wgmma, None for every arch); the first pattern that matches applies
CONTRACTS = [
    (re.compile(r"hopper::.*forward_kernel"), ("HGMMA", "LDGSTS", "SYNCS", "FENCE.VIEW.ASYNC.S"), 168, True, "sm_90a"),
    (re.compile(r"hopper::.*dw_kernel"), ("HGMMA", "LDGSTS", "SYNCS", "FENCE.VIEW.ASYNC.S"), 168, True, "sm_90a"),
    (re.compile(r"hopper::.*dp_kernel"), ("HGMMA", "LDGSTS", "SYNCS", "FENCE.VIEW.ASYNC.S"), 168, True, "sm_90a"),
    # the dx writer: bandwidth-bound, three blocks per SM (__launch_bounds__), acc[8] in registers
    (re.compile(r"dx::.*tube_dx_writer_kernel"), (), 85, True, "sm_90a"),
    (re.compile(r"hopper::"), (), 255, True, "sm_90a"),
]
DEFAULT_CONTRACT = ((), 255, False, "sm_90a")


def find_cuobjdump(explicit=None):
    if explicit:
        return explicit
    for cand in (shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                          "cuobjdump")):
        if cand and os.path.exists(cand):
            return cand
    try:
        import triton
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    return None


def find_lib(explicit=None):
    if explicit:
        return explicit
    tag = f"cpython-{sys.version_info[0]}{sys.version_info[1]}"
    libs = glob.glob(os.path.join(ROOT, "tubevit_ext", f"_C.{tag}*.so"))
    return libs[0] if libs else None


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines() if out.returncode == 0 else names
    return dict(zip(names, lines if len(lines) == len(names) else names))


def _by_function(text, header):
    """(mangled name, arch, line) for each line of cuobjdump output after a function's header line
    (`header`: a regex whose group 1 is the name)."""
    name = arch = None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(header, line)
        if m:
            name = m.group(1)
        elif name is not None:
            yield name, arch, line


def kernels(cuobjdump, lib):
    """{(mangled name, arch): dict(arch, regs, stack, shared, local, sass=set of mnemonics)} for every
    kernel of every architecture in lib."""
    run = lambda flag: subprocess.run([cuobjdump, flag, lib], capture_output=True, text=True, check=True).stdout
    out = {}
    for name, arch, line in _by_function(run("-res-usage"), r"\s*Function (\S+):"):
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m:
            out[(name, arch)] = dict(arch=arch, regs=int(m.group(1)), stack=int(m.group(2)),
                                     shared=int(m.group(3)), local=int(m.group(4)), sass=set())
    for name, arch, line in _by_function(run("-sass"), r"\s*Function : (\S+)"):
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and (name, arch) in out:
            out[(name, arch)]["sass"].add(m.group(1))
    return out


def check(info, pretty):
    """Violations of the contracts for one kernel (empty list: it keeps them)."""
    bad = []
    required, budget, no_local, on_arch = next(
        ((req, regs, nl, arch) for pat, req, regs, nl, arch in CONTRACTS if pat.search(pretty)), DEFAULT_CONTRACT)
    if on_arch is not None and info["arch"] != on_arch:
        required = ()  # e.g. no wgmma before sm_90a
    if no_local and (info["local"] or info["stack"]):
        bad.append(f"local memory (LOCAL {info['local']}, STACK {info['stack']})")
    if info["regs"] > budget:
        bad.append(f"{info['regs']} registers > budget {budget}")
    for mnemonic in required:
        if not any(s == mnemonic or s.startswith(mnemonic + ".") for s in info["sass"]):
            bad.append(f"no {mnemonic}")
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", help="the built library (default: tubevit_ext/_C.<this python>.so)")
    ap.add_argument("--cuobjdump", help="cuobjdump to use (default: CUDA_HOME's, else triton's)")
    ap.add_argument("--json", help="write one row per kernel here")
    a = ap.parse_args(argv)
    cuobjdump, lib = find_cuobjdump(a.cuobjdump), find_lib(a.lib)
    if cuobjdump is None or lib is None:
        print(f"check_sass: cannot run (cuobjdump {cuobjdump!r}, library {lib!r})", file=sys.stderr)
        return 2
    ks = kernels(cuobjdump, lib)
    names = demangle(sorted({n for n, _ in ks}))
    rows, failed = [], 0
    for (name, arch), info in sorted(ks.items(), key=lambda kv: (names[kv[0][0]], kv[0][1] or "")):
        pretty = names[name]
        bad = check(info, pretty)
        failed += bool(bad)
        rows.append(dict(kernel=pretty, arch=arch, regs=info["regs"], stack=info["stack"], local=info["local"],
                         shared=info["shared"], hgmma=any(s.startswith("HGMMA") for s in info["sass"]),
                         violations=bad))
        print(f"{'FAIL' if bad else 'ok  '} {arch or '?':7s} regs {info['regs']:3d} local {info['local']:4d} "
              f"stack {info['stack']:4d} "
              f"{pretty[:110]}" + (f"  <- {'; '.join(bad)}" if bad else ""))
    hopper = [r for r in rows if "hopper::" in r["kernel"] and r["arch"] == "sm_90a"]
    print(f"{len(rows)} kernels, {failed} violating; sm_90a Hopper kernels: {len(hopper)}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(lib=os.path.basename(lib), rows=rows), fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
