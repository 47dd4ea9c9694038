"""The fast kernels (blocked matmul for every dtype, float and int8 paths; attention tiles and the decode
ranges, full and windowed; attention against attention_reference() on f32, f16 and q8 caches
with sinks and LM-Infinite) against references on shapes that are not multiples of their blocks: tests/kernel_driver.c, built as ./run is (-O3 -march=native, OpenMP),
built portably (-O2, no -march, one thread: the portable C beside the AVX2 intrinsics) and
under ASan/UBSan, both ways."""
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
    "sanitized": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "native_sanitized": ["-O1", "-g", "-march=native", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}


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
