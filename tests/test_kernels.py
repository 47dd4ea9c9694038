"""The fast kernels (blocked matmul for every dtype, float and int8 paths; attention tiles and the decode
ranges, full and windowed; attention against attention_reference() on f32, f16 and q8 caches
with sinks and LM-Infinite) against references on shapes that are not multiples of their blocks: tests/kernel_driver.c, built as ./run is (-O3 -march=native, OpenMP),
built portably (-O2, no -march, one thread: the portable C beside the intrinsics), natively
without AVX-512 (-mno-avx512f: the AVX2 kernels, with AVX-VNNI's vpdpwssd where the CPU has it),
natively without either (-mno-avxvnni too: AVX2's vpmaddwd + vpaddd), and under ASan/UBSan,
both ways. Each build names its kernel set; on an x86 machine with AVX2 the native builds must
name the set this CPU has (/proc/cpuinfo), and a set the CPU lacks is printed as not exercised.
AArch64's NEON: test_aarch64.py."""
import os
import subprocess

import pytest
from conftest import ROOT

def openmp_flag():
    """-fopenmp if the compiler has it (the Makefile's rule: OpenMP is optional)."""
    r = subprocess.run([os.environ.get("CC", "cc"), "-fopenmp", "-x", "c", "-", "-o", os.devnull],
                       input="int main(void){return 0;}", capture_output=True, text=True)
    return ["-fopenmp"] if r.returncode == 0 else []


BUILDS = {
    "native_openmp": ["-O3", "-march=native", "-ffp-contract=fast", "-fno-trapping-math", *openmp_flag()],
    "portable": ["-O2"],
    "native_avx2": ["-O3", "-march=native", "-mno-avx512f", "-ffp-contract=fast", "-fno-trapping-math"],
    "native_avx2_no_vnni": ["-O3", "-march=native", "-mno-avx512f", "-mno-avxvnni", "-ffp-contract=fast",
                            "-fno-trapping-math"],
    "sanitized": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "native_sanitized": ["-O1", "-g", "-march=native", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}
AVX512 = "AVX-512 + VNNI, AVX2 + FMA + F16C"
AVX2_VNNI = "AVX2 + FMA + F16C + AVX-VNNI"
AVX2 = "AVX2 + FMA + F16C"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def expected_set(build):
    """The kernel set a build must name on this CPU (None: not an x86 with AVX2)."""
    flags = set(cpu_flags())
    if not {"avx2", "fma", "f16c"} <= flags:
        return None
    if not build.startswith("native"):
        return "portable C"
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags and "avx2" not in build:
        return AVX512
    if "avx_vnni" in flags and build != "native_avx2_no_vnni":
        return AVX2_VNNI
    return AVX2


@pytest.mark.parametrize("build", list(BUILDS))
def test_kernels_match_references(tmp_path, build):
    exe = str(tmp_path / "kernel_driver")
    cc = os.environ.get("CC", "cc")
    r = subprocess.run([cc, *BUILDS[build], "-std=c11", "-Wall", "-Wextra", "-Werror", "-o", exe,
                        os.path.join(ROOT, "tests", "kernel_driver.c"), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    print("\n" + r.stdout)
    assert r.returncode == 0 and "all within 1e-5" in r.stdout, r.stdout + r.stderr
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, r.stderr
    assert r.stdout.count("max rel err") == 90
    named = r.stdout.splitlines()[0].removeprefix("kernels: ")
    want = expected_set(build)
    assert want is None or named == want, (named, want)
    if build == "native_openmp":
        run_here = {expected_set(b) for b in BUILDS}
        missing = [k for k in (AVX512, AVX2_VNNI, AVX2) if k not in run_here]
        print(f"[kernels] ./run's set here: {named}; not exercised on this CPU: "
              f"{'; '.join(missing) or 'none of the x86 sets'} (NEON: test_aarch64.py, under qemu)")
