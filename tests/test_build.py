"""The Makefile: ./run is rebuilt when its compile flags change (make OPENMP= after make), not only
when a source does."""
import os
import shutil
import subprocess

from conftest import ROOT

SOURCES = ["Makefile", "run.c", "kernels.c", "tokenizer.c", "tokenizer_unicode.h", "model.h"]


def test_changed_flags_rebuild_run(tmp_path):
    for name in SOURCES:
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    make = lambda *a: subprocess.run(["make", "run", "CFLAGS=-O0", *a], cwd=tmp_path, capture_output=True,  # noqa: E731
                                     text=True, check=True).stdout
    assert "-o run run.c" in make()
    assert "-o run run.c" not in make(), "nothing changed, yet ./run was rebuilt"
    rebuilt = make("OPENMP=")
    assert "-o run run.c" in rebuilt and "-fopenmp" not in rebuilt, "make OPENMP= kept the OpenMP build"
    assert "-o run run.c" not in make("OPENMP=")
