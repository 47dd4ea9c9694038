"""The fast kernels (blocked matmul for every dtype, float and int8 paths; attention tiles and the decode
ranges, full and windowed; attention against attention_reference() on f32, f16 and q8 caches
with sinks and LM-Infinite) against references on shapes that are not multiples of their blocks: tests/kernel_driver.c, built as ./run is (-O3 -march=native, OpenMP),
built portably (-O2, no -march, one thread: the portable C beside the AVX2 intrinsics),
natively with AVX-512 VNNI but not AVX-VNNI (-mno-avxvnni: the EVEX vpdpwssd), natively without
VNNI (-mno-avxvnni -mno-avx512vnni: AVX2's vpmaddwd + vpaddd where VNNI's vpdpwssd would be),
and under ASan/UBSan, both ways. Each build names its kernel set; on an x86
machine with AVX2 the native builds must name the VNNI this CPU has (/proc/cpuinfo), and an
instruction set the CPU lacks is printed as not exercised. AArch64's NEON: test_aarch64.py."""
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
    "native_avx512_vnni": ["-O3", "-march=native", "-mno-avxvnni", "-ffp-contract=fast",
                           "-fno-trapping-math"],
    "native_no_vnni": ["-O3", "-march=native", "-mno-avxvnni", "-mno-avx512vnni", "-ffp-contract=fast",
                       "-fno-trapping-math"],
    "sanitized": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "native_sanitized": ["-O1", "-g", "-march=native", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def expected_set(build):
    """The kernel set a build must name on this CPU (None: not an x86 with AVX2)."""
    flags = cpu_flags()
    if not {"avx2", "fma", "f16c"} <= set(flags):
        return None
    if not build.startswith("native"):
        return "portable C"
    if "avx_vnni" in flags and build in ("native_openmp", "native_sanitized"):
        return "AVX2 + FMA + F16C + AVX-VNNI"
    if "avx512_vnni" in flags and "avx512vl" in flags and build != "native_no_vnni":
        return "AVX2 + FMA + F16C + AVX512-VNNI"
    return "AVX2 + FMA + F16C"


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
        missing = [f for f in ("avx2", "avx_vnni", "avx512_vnni") if f not in cpu_flags()]
        print(f"[kernels] ./run's set here: {named}; kernels of {', '.join(missing) or 'no x86 set'}"
              " not exercised on this CPU (NEON: test_aarch64.py, under qemu)")
