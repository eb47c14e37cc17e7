"""Builds latentseek_ext._C: the CPU kernel always, the CUDA kernel when torch itself was built with CUDA.

    pip install torch==2.13.0            # first: pip's build isolation would pull a CUDA torch
    pip install --no-build-isolation -e .

TORCH_CUDA_ARCH_LIST picks the GPU targets (default "8.0;9.0a"); LATENTSEEK_NO_CUDA=1 forces a CPU-only build.
"""

import glob
import os
import shutil
import subprocess
import sys

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

# libstdc++ must be the shared library that torch uses. A compiler whose default links a static copy (the H200
# image's /opt/gcc did) leaves a private libstdc++ inside _C: its streams meet the locale set up by torch's, and a
# TORCH_CHECK message with an integer in it came out cut short (CPU) or crashed the process (that GPU image).
# The explicit -Bdynamic -lstdc++ comes before the compiler's own libraries, so the shared one wins.
LINK_ARGS = ["-fopenmp", "-Wl,--push-state,-Bdynamic,-lstdc++,--pop-state"]


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
            extra_link_args=LINK_ARGS,
        )
    return CppExtension(
        "latentseek_ext._C",
        cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=LINK_ARGS,
    )


def _check_shared_libstdcxx(path: str) -> None:
    """Refuses a built extension that defines libstdc++'s own stream code (a private static copy, see LINK_ARGS)."""
    nm = shutil.which("nm")
    if not sys.platform.startswith("linux") or nm is None or not os.path.exists(path):
        return
    symbols = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True).stdout
    if "_ZNSo9_M_insert" in symbols:  # std::ostream::_M_insert<T>, which lives in libstdc++.so
        raise SystemExit(
            f"{path} carries a private copy of libstdc++ (it defines std::ostream::_M_insert): its error messages "
            "would be cut short or crash beside torch's libstdc++. Build with a compiler that links libstdc++ "
            "dynamically, e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++."
        )


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    def build_extensions(self):
        super().build_extensions()
        for ext in self.extensions:
            _check_shared_libstdcxx(self.get_ext_fullpath(ext.name))


setup(
    name="latentseek",
    version="0.1.0",
    description="LatentSeek test-time latent policy gradient with a fused LM-head kernel",
    packages=["latentseek_ext", "latentseek", "latentseek.eval"],
    package_dir={"latentseek_ext": "latentseek_ext", "latentseek": "python/latentseek"},
    package_data={"latentseek.eval": ["assets/*.jsonl", "assets/README.md", "assets/LICENSE.*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "transformers>=4.45", "tqdm", "matplotlib", "math-verify"],
    extras_require={"hub": ["datasets"], "parquet": ["pyarrow"], "gguf": ["gguf", "accelerate"]},
    entry_points={"console_scripts": ["latentseek = latentseek.eval.cli:main"]},
)
