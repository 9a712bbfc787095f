"""Builds marginops._C: the CPU extension always, the CUDA kernels when torch has CUDA and nvcc
is found. Environment switches: MARGINOPS_FORCE_CUDA=1 (fail unless CUDA is built),
MARGINOPS_SKIP_CUDA=1 (never build CUDA), TORCH_CUDA_ARCH_LIST (as torch reads it),
MAX_JOBS (parallel compile jobs, as torch reads it)."""

import glob
import os
import re

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


# The oldest torch whose ATen has the out_dtype overloads of mm_out/addmm_out (torch 2.8) that
# csrc/cuda/register_cuda.cpp's GEMMs use; verified on a GPU with torch 2.11 (scripts/gpu-check).
CUDA_TORCH_FLOOR = (2, 8)


def torch_version():
    return tuple(int(v) for v in re.findall(r"\d+", torch.__version__.split("+")[0])[:2])


def want_cuda():
    force, skip = _flag("MARGINOPS_FORCE_CUDA"), _flag("MARGINOPS_SKIP_CUDA")
    if force and skip:
        raise RuntimeError("MARGINOPS_FORCE_CUDA=1 and MARGINOPS_SKIP_CUDA=1 contradict each other")
    if skip:
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if available and torch_version() < CUDA_TORCH_FLOOR:
        raise RuntimeError(
            f"the CUDA kernels need torch >= {'.'.join(map(str, CUDA_TORCH_FLOOR))} (the chunked backend's GEMMs "
            f"call ATen's mm_out/addmm_out with out_dtype, 16-bit operands into float32), found torch "
            f"{torch.__version__}; upgrade torch, or build the CPU kernels only with MARGINOPS_SKIP_CUDA=1"
        )
    if force and not available:
        raise RuntimeError(
            "MARGINOPS_FORCE_CUDA=1, but "
            + (
                "the installed torch has no CUDA"
                if torch.version.cuda is None
                else "nvcc was not found (set CUDA_HOME)"
            )
        )
    return available


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def cuda_library_includes():
    """Include folders for the CUDA libraries' headers (cuBLAS, cuSPARSE: ATen/cuda/CUDABlas.h
    needs them) when the toolkit at CUDA_HOME ships nvcc without them: those of the nvidia-*
    wheels that a pip-installed CUDA torch depends on."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = [
        os.path.dirname(h)
        for base in nvidia.__path__
        for h in glob.glob(os.path.join(base, "**", "include", "cusparse.h"), recursive=True)
    ]
    return sorted(set(found))


def extension():
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not want_cuda():
        return CppExtension("marginops._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    srcs += sources("csrc/cuda/*/*.cu") + sources("csrc/cuda/*.cpp")
    return CUDAExtension(
        "marginops._C",
        srcs,
        define_macros=[("MARGINOPS_WITH_CUDA", "1")],
        include_dirs=cuda_library_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
