"""Build stablenets_ext._C: CPU kernels always, CUDA kernels when torch and nvcc allow.

Environment knobs (printed at build time):
  FORCE_CUDA=1             build the CUDA kernels even with no GPU visible
  STABLENETS_NO_CUDA=1     never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST     CUDA targets; default with no GPU visible: "8.0;9.0+PTX"
  STABLENETS_CPU_ISAS      CPU kernel variants to compile, comma-separated from "generic",
                           "avx2", "avx512" (default: all three; "native": the best one this
                           build machine runs). Each is its own library,
                           stablenets_ext/_cpu_<isa>.so; at import the best one the running
                           CPU supports is loaded (STABLENETS_CPU_ISA=<isa> forces one)
  MAX_JOBS                 parallel compile jobs (ninja)
  DEBUG=1                  -O0 -g
  STABLENETS_PREBUILT=1    package only, no compile: the extension was already built
                           in place (`setup.py build_ext --inplace`); the Makefile uses
                           this for the editable install so nothing is compiled twice
Install with: pip install --no-build-isolation .
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def log(msg):
    print(f"[stablenets-ext setup] {msg}", flush=True)


def find_cuda_home():
    """The real toolkit: /usr/local/bin/nvcc may be a wrapper, so prefer a folder
    whose bin/nvcc exists next to its lib64/include."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


cuda_home = find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def nvcc_version(home):
    out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def want_cuda():
    if os.environ.get("STABLENETS_NO_CUDA", "0") == "1":
        return False, "STABLENETS_NO_CUDA=1"
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if torch.version.cuda is None:
        if forced:
            sys.exit("FORCE_CUDA=1 but this torch is a CPU-only build; install a CUDA build of torch")
        return False, "torch is a CPU-only build"
    if cuda_home is None:
        if forced:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        return False, "no CUDA toolkit (nvcc) found"
    ver = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if ver is None or ver[0] != torch_major:
        sys.exit(
            f"The CUDA toolkit at {cuda_home} is {ver}, but torch {torch.__version__} was built "
            f"with CUDA {torch.version.cuda}. Install a CUDA {torch_major}.x toolkit and point "
            f"CUDA_HOME at it, or build without CUDA: STABLENETS_NO_CUDA=1 pip install "
            f"--no-build-isolation ."
        )
    return True, f"torch CUDA {torch.version.cuda}, nvcc {ver[0]}.{ver[1]} at {cuda_home}"


def pip_nvidia_dirs(sub):
    """Headers/libraries of the pip 'nvidia' packages (cuBLAS, cuSPARSE, ...), which
    torch's CUDA headers include but a bare toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "*", sub)))
    return dirs


def torch_cublas():
    """The libcublas that this process's torch loaded (import torch loads
    libtorch_cuda and its cuBLAS), so the extension links that exact library."""
    major = torch.version.cuda.split(".")[0]
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if f"/libcublas.so.{major}" in line}
    except OSError:
        paths = set()
    for lib in pip_nvidia_dirs("lib") + ([os.path.join(cuda_home, "lib64")] if cuda_home else []):
        paths.update(glob.glob(os.path.join(lib, f"libcublas.so.{major}")))
    paths = sorted(p for p in paths if os.path.exists(p))
    return paths[0] if paths else None



# One build of the CPU kernels per instruction set, as torch builds its own CPU
# kernels: a wheel then runs on any x86-64 CPU and uses AVX-512 where there is
# one. The flag sets match stablenets_ext/_cpu_isa.py, which picks at import.
CPU_ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma",
               "-mprefer-vector-width=512"],
}


def native_isa():
    try:
        words = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "generic"
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma"} <= words:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= words else "generic"


def cpu_isas():
    spec = os.environ.get("STABLENETS_CPU_ISAS", "generic,avx2,avx512").strip()
    if spec == "native":
        return [native_isa()]
    isas = [x.strip() for x in spec.split(",") if x.strip()]
    bad = [x for x in isas if x not in CPU_ISA_FLAGS]
    if bad or not isas:
        sys.exit(f"STABLENETS_CPU_ISAS: expected a comma-separated list of {sorted(CPU_ISA_FLAGS)} "
                 f"or 'native', got {spec!r}")
    return isas


def isa_sources(isa, cpu_sources):
    """Per-ISA copies of the CPU kernel files (one-line #include wrappers under build/),
    so each variant's objects land in their own place."""
    out = []
    folder = os.path.join("build", "isa_src", isa)
    os.makedirs(os.path.join(ROOT, folder), exist_ok=True)
    for src in cpu_sources:
        wrapper = os.path.join(folder, os.path.basename(src))
        text = (f"// generated by setup.py: the {isa} build of {src}\n"
                f'#include "{os.path.join(ROOT, src)}"\n')
        path = os.path.join(ROOT, wrapper)
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        out.append(wrapper)
    return out


debug = os.environ.get("DEBUG", "0") == "1"
opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
cxx_flags = opt + ["-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
include_dirs = [os.path.join(ROOT, "csrc", "include")]
sources = [os.path.join("csrc", f) for f in ("ops.cpp", "autograd.cpp", "autocast.cpp")]

# Compile order. setuptools builds one extension after another and sorts each
# one's sources by path (for a reproducible link), and ninja 1.11 starts the
# compiles in that order: with MAX_JOBS=2 (the 2-core CI machine) csrc/cuda/stacks.cu,
# one of the slowest files, started last and ran alone at the end. BuildExt
# below hands ninja the slowest files first and still links in sorted order.
# CPU time measured 2026-12-05 (nvcc 13.0, g++ 12, two target architectures):
# the CUDA files that include ATen 45-60 s each (nvcc parses ATen once for the
# host and once per architecture), autograd.cpp 29 s, ops.cpp 6 s, the ATen-free
# narrow_<dtype>_d<D>.cu 6-19 s; per ISA variant (about 170 s in all) the tile
# kernels conv/resnet/verlet/leapfrog 30-45 s each, the other two about 12 s.
SLOW_FIRST = ("stacks.cu", "conv.cu", "narrow.cu", "autograd.cpp",
              "conv.cpp", "resnet.cpp", "verlet.cpp", "leapfrog.cpp")


def slow_first(paths):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    return sorted(paths, key=lambda p: (rank.get(os.path.basename(p), len(rank)), p))


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    def build_extension(self, ext):
        # BuildExtension has replaced compiler.compile with its ninja writer by now.
        compile_ = self.compiler.compile

        def compile_slow_first(sources, *args, **kwargs):
            order = slow_first(sources)
            objects = dict(zip(order, compile_(order, *args, **kwargs)))
            return [objects[src] for src in sources]  # the link order stays sorted

        self.compiler.compile = compile_slow_first
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_


cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
isas = cpu_isas()
cpu_exts = [
    CppExtension(
        f"stablenets_ext._cpu_{isa}",
        isa_sources(isa, cpu_sources),
        include_dirs=include_dirs + [os.path.join(ROOT, "csrc", "cpu")],
        extra_compile_args={"cxx": cxx_flags + CPU_ISA_FLAGS[isa]},
        extra_link_args=["-fopenmp"],
    )
    for isa in isas
]

use_cuda, why = want_cuda()
if use_cuda:
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cu:
        use_cuda, why = False, "no CUDA sources in csrc/cuda"
if use_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = torch.cuda.is_available()
        if not visible:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    include_dirs += pip_nvidia_dirs("include")
    cublas = torch_cublas()
    cuda_defs = ["-DSTABLENETS_WITH_CUDA"] + (["-DSTABLENETS_WITH_CUBLAS"] if cublas else [])
    cuda_link = [cublas, "-Wl,-rpath," + os.path.dirname(cublas)] if cublas else []
    ext = CUDAExtension(
        "stablenets_ext._C",
        sources + cu,
        include_dirs=include_dirs,
        library_dirs=pip_nvidia_dirs("lib"),
        extra_compile_args={
            "cxx": cxx_flags + cuda_defs,
            "nvcc": (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["-std=c++20", "-lineinfo",
                                                                 "--expt-relaxed-constexpr"]
            + cuda_defs,
        },
        extra_link_args=["-fopenmp"] + cuda_link,
    )
    log(f"cuBLAS for the wide regime: {cublas or 'not found next to torch; at::mm fallback'}")
    log(f"building CPU + CUDA kernels ({why}); TORCH_CUDA_ARCH_LIST="
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(detected from the visible GPU)')}; "
        f"CUDA sources: {', '.join(cu)}")
else:
    ext = CppExtension(
        "stablenets_ext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    log(f"building CPU kernels only ({why})")
log(f"CPU kernel variants: {', '.join(isas)} (chosen at import; this machine: {native_isa()}); "
    f"{'DEBUG' if debug else 'release'} build; MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}")

prebuilt = os.environ.get("STABLENETS_PREBUILT", "0") == "1"
if prebuilt:
    log("STABLENETS_PREBUILT=1: packaging the in-place build, compiling nothing")

setup(
    name="stablenets-ext",
    packages=find_packages(include=["stablenets_ext", "stablenets_ext.*"]),
    ext_modules=[] if prebuilt else [ext] + cpu_exts,
    cmdclass={"build_ext": BuildExt},
)
