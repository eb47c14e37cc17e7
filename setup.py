"""Builds latentseek_ext._C: the CPU kernel always, the CUDA kernel when torch itself was built with CUDA.

    pip install torch==2.13.0            # first: pip's build isolation would pull a CUDA torch
    pip install --no-build-isolation -e .

TORCH_CUDA_ARCH_LIST picks the GPU targets (default "8.0;9.0a"); LATENTSEEK_NO_CUDA=1 forces a CPU-only build.
"""

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - a build without torch cannot produce the extension
    raise SystemExit(
        "latentseek needs torch installed before it is built: `pip install torch==2.13.0`, "
        "then `pip install --no-build-isolation -e .`"
    ) from e

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extension():
    cpp_sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("LATENTSEEK_NO_CUDA") != "1"
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        return CUDAExtension(
            "latentseek_ext._C",
            cpp_sources + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags + ["-DLATENTSEEK_WITH_CUDA"],
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-DLATENTSEEK_WITH_CUDA", "--expt-relaxed-constexpr"],
            },
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "latentseek_ext._C",
        cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="latentseek",
    version="0.1.0",
    description="LatentSeek test-time latent policy gradient with a fused LM-head kernel",
    packages=["latentseek_ext", "latentseek"],
    package_dir={"latentseek_ext": "latentseek_ext", "latentseek": "python/latentseek"},
    package_data={"latentseek": ["data/*.jsonl"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "transformers>=4.45", "tqdm", "matplotlib", "math-verify"],
    extras_require={"hub": ["datasets"], "parquet": ["pyarrow"], "gguf": ["gguf", "accelerate"]},
    entry_points={"console_scripts": ["latentseek = latentseek.cli:main"]},
)
