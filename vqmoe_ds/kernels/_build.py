"""Build description of the nearest-code extension, shared by setup.py and the JIT fallback.

Kept free of package imports (setup.py loads this file by path, before vqmoe_ds is importable) and
of any side effect: nothing is compiled until setuptools or ``torch.utils.cpp_extension.load`` asks.

Why the build is optional: vqmoe-ds must install on machines without a compiler or with a torch
whose headers do not match; the library then JIT-compiles on first use or runs the pure-torch path
(same results, slower).  So a failing extension build prints a warning and the install carries on.
"""
import os
import sys

EXT_NAME = "vqmoe_ds.kernels._nearest_code_ext"
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
CPU_SOURCES = ["nearest_code_cpu.cpp"]
CUDA_SOURCES = ["nearest_code_cuda.cu"]

# -ffp-contract=off: the fp64 re-check must round exactly like the torch path (no FMA contraction).
# -fno-math-errno: lets sqrt vectorise.  -fopenmp: at::parallel_for is OpenMP in the torch wheels.
# No -march=native: the CPU kernel dispatches AVX-512/AVX2/baseline itself (target_clones).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
# --fmad=false mirrors -ffp-contract=off; the kernel also uses explicit __fmaf_rn/__dadd_rn intrinsics.
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo"]
LD_FLAGS = ["-fopenmp"]


def want_cuda(cpp_extension) -> bool:
    """Build the CUDA kernel when torch is a CUDA build and nvcc (CUDA_HOME) is present."""
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def setup_kwargs(repo_root: str) -> dict:
    """``ext_modules``/``cmdclass`` for setup(); empty when torch is not importable at build time."""
    try:
        from torch.utils import cpp_extension
    except ImportError as e:  # isolated build without torch: install the pure-Python package
        print(f"vqmoe_ds: torch not importable ({e}); skipping the nearest_code extension", file=sys.stderr)
        return {}
    rel = os.path.relpath(CSRC, repo_root)
    cuda = want_cuda(cpp_extension)
    sources = [os.path.join(rel, s) for s in CPU_SOURCES + (CUDA_SOURCES if cuda else [])]
    cls = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    ext = cls(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[CSRC],
        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
        extra_link_args=list(LD_FLAGS),
        optional=True,
    )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja, right flags), but a failed build only warns."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any failure must leave the install working
                self._warn(e)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self._warn(e)

        @staticmethod
        def _warn(e):
            print(f"WARNING vqmoe_ds: building {EXT_NAME} failed ({type(e).__name__}: {e}); the library "
                  "will JIT-compile it on first use or fall back to the pure-torch path", file=sys.stderr)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}}
