"""Is the GPU code of the tensor-core kernels still what was tested on a GPU?

    python bench/compare_ptx.py BASE_REV [--base-defines "TUBEVIT_TC_MIN_BLOCKS=4"] [--defines "..."]
    python bench/compare_ptx.py BASE_REV --source csrc/cuda/tube_tokens_cuda.cu   # GEMM path + naive kernels

Compiles csrc/cuda/tube_tokens_tc.cu (or --source) to PTX (sm_90, the flags torch's
extension build uses) twice: from git revision BASE_REV (a temporary
worktree) and from the working tree, then compares every kernel entry after
renaming what carries no meaning (virtual register numbers, labels, .loc
lines, comments, local-depot numbers, the anonymous-namespace hash). Prints one line per kernel:
IDENTICAL or how many lines differ. Session 5 used it to show that refactors
made after the GPU runs left the verified default kernels unchanged
(bench/NOTES.md). Needs nvcc (CUDA_HOME) and a CUDA build of torch; no GPU.
"""
import argparse
import difflib
import glob
import os
import re
import subprocess
import sys
import tempfile

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = "csrc/cuda/tube_tokens_tc.cu"


def nvcc_ptx(tree, defines, out, source=SOURCE):
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    includes = [os.path.join(tree, "csrc")] + cpp_extension.include_paths(device_type="cuda")
    # the CUDA wheels' headers (cuda_bf16.h etc.), as setup.py adds them
    site = os.path.dirname(os.path.dirname(cpp_extension.__file__))
    includes += sorted(glob.glob(os.path.join(os.path.dirname(site), "nvidia", "*", "include")))
    cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-ptx", "-arch=sm_90", "-O3", "-std=c++20",
           "-DTUBEVIT_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           *cpp_extension.COMMON_NVCC_FLAGS, *[f"-D{d}" for d in defines.split()],
           *[f"-I{i}" for i in includes], os.path.join(tree, source), "-o", out]
    subprocess.run(cmd, check=True)


def _anonymous_namespaces(text):
    """Replace each mangled anonymous namespace (<len>_GLOBAL__N__<hash>_<file>_cu_<hash>_<n>,
    whose hashes and counter change with unrelated edits) by 2NS, cutting it by its length prefix."""
    out, pos = [], 0
    for m in re.finditer(r"(\d+)_GLOBAL__N__", text):
        if m.start() < pos:
            continue
        n = int(m.group(1))
        out.append(text[pos:m.start()] + "2NS")
        pos = m.start(1) + len(m.group(1)) + n
    out.append(text[pos:])
    return "".join(out)


def kernels(path):
    text = _anonymous_namespaces(open(path).read())
    out = {}
    for m in re.finditer(r"\.entry (\S+)\(", text):
        body = text[m.start():text.find("\n}\n", m.start())]
        body = re.sub(r"%(r|rd|f|fd|p|rs|h|hh)\d+", r"%\1", body)
        body = re.sub(r"\$L__BB\d+_\d+", "L", body)
        body = re.sub(r"__local_depot\d+", "__local_depot", body)  # numbered in file order
        body = re.sub(r"//[^\n]*", "", body)
        out[m.group(1)] = [line for line in body.splitlines() if line.strip() and not line.strip().startswith(".loc")]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("--base-defines", default="", help="macros for the base build (TUBEVIT_DEFINES syntax)")
    ap.add_argument("--defines", default="", help="macros for the working-tree build")
    ap.add_argument("--source", default=SOURCE, help="the .cu file to compare (default: %(default)s)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wt = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", wt, a.base], check=True)
        try:
            nvcc_ptx(wt, a.base_defines, os.path.join(tmp, "base.ptx"), a.source)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", wt], check=True)
        nvcc_ptx(ROOT, a.defines, os.path.join(tmp, "new.ptx"), a.source)
        old, new = kernels(os.path.join(tmp, "base.ptx")), kernels(os.path.join(tmp, "new.ptx"))
    same = True
    for name in sorted(old):
        m = re.search(r"(tube_\w*?kernel)I(\w+?)E", name)
        tag = f"{m.group(1)}<{m.group(2)}>" if m else name
        if name not in new:
            print(f"{tag}: not in the working tree")
            same = False
            continue
        diff = [d for d in difflib.unified_diff(old[name], new[name], lineterm="", n=0)
                if d[:1] in "+-" and d[:3] not in ("+++", "---")]
        print(f"{tag}: " + ("IDENTICAL" if not diff else f"{len(diff)} lines differ"))
        same = same and not diff
    for name in sorted(set(new) - set(old)):
        print(f"(new kernel) {name}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
