"""Is the GPU code of the kernels still what was tested on a GPU?

    python bench/compare_ptx.py BASE_REV [--base-defines "..."] [--defines "..."]
    python bench/compare_ptx.py BASE_REV --source csrc/cuda/tube_tokens_tc.cu   # one file

Compiles every .cu file under csrc/ (or --source) to PTX (sm_90, the flags
torch's extension build uses) twice: from git revision BASE_REV (a temporary
worktree) and from the working tree, then compares every kernel entry after
renaming what carries no meaning (virtual register numbers, labels, .loc
lines, comments, local-depot numbers, the anonymous-namespace hash, the
kernel's own mangled name inside its body). Kernels are matched by their
demangled name with namespaces removed, so a kernel that moved to another
file or namespace is still compared with itself. Prints one line per
kernel: IDENTICAL or how many lines differ; exit status 1 when any differs
or is missing. bench/RESULTS.md names the tree whose kernels last ran on a
GPU. Needs nvcc (CUDA_HOME), c++filt and a CUDA build of torch; no GPU.
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


def sources(tree):
    return sorted(os.path.relpath(p, tree) for p in glob.glob(os.path.join(tree, "csrc", "**", "*.cu"),
                                                              recursive=True))


def _wheel_cutlass():
    import importlib.util
    spec = importlib.util.find_spec("cutlass_library")
    path = os.path.join(os.path.dirname(spec.origin), "source", "include") if spec and spec.origin else None
    return path if path and os.path.isdir(path) else None


def nvcc_ptx(tree, defines, out, source):
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    includes = [os.path.join(tree, "csrc")] + cpp_extension.include_paths(device_type="cuda")
    # the CUDA wheels' headers (cuda_bf16.h etc.), as setup.py adds them
    site = os.path.dirname(os.path.dirname(cpp_extension.__file__))
    includes += sorted(glob.glob(os.path.join(os.path.dirname(site), "nvidia", "*", "include")))
    # the CUTLASS/CuTe headers of the prototype's Hopper kernels (csrc/prototype/), as setup.py finds them; at
    # sm_90 (not 9.0a) their wgmma bodies compile empty, so those kernels are listed, not compared
    includes += [p for p in [os.environ.get("CUTLASS_INCLUDE") or _wheel_cutlass()] if p]
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


def _key(mangled):
    """The kernel's demangled name without namespaces: stable across moves between files/namespaces."""
    name = subprocess.run(["c++filt"], input=mangled, capture_output=True, text=True, check=True).stdout.strip()
    name = name.replace("(anonymous namespace)::", "")
    return re.sub(r"\b(?:\w+::)+", "", name)


def kernels(path):
    text = _anonymous_namespaces(open(path).read())
    out = {}
    for m in re.finditer(r"\.entry (\S+)\(", text):
        body = text[m.start():text.find("\n}\n", m.start())]
        body = body.replace(m.group(1)[2:], "KERNEL")  # parameter and static shared-memory names
        body = re.sub(r"%(r|rd|f|fd|p|rs|h|hh)\d+", r"%\1", body)
        body = re.sub(r"\$L__BB\d+_\d+", "L", body)
        body = re.sub(r"__local_depot\d+", "__local_depot", body)  # numbered in file order
        body = re.sub(r"//[^\n]*", "", body)
        out[_key(m.group(1))] = [line for line in body.splitlines()
                                 if line.strip() and not line.strip().startswith(".loc")]
    return out


def all_kernels(tree, defines, tmp, tag, only):
    out = {}
    for i, src in enumerate([only] if only else sources(tree)):
        ptx = os.path.join(tmp, f"{tag}{i}.ptx")
        nvcc_ptx(tree, defines, ptx, src)
        out.update(kernels(ptx))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("--base-defines", default="", help="macros for the base build: \"NAME[=VALUE] ...\"")
    ap.add_argument("--defines", default="", help="macros for the working-tree build")
    ap.add_argument("--source", default=None, help="one .cu file to compare (default: every .cu under csrc/)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wt = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", wt, a.base], check=True)
        try:
            old = all_kernels(wt, a.base_defines, tmp, "base", a.source)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", wt], check=True)
        new = all_kernels(ROOT, a.defines, tmp, "new", a.source)
    same = True
    for name in sorted(old):
        tag = name
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
