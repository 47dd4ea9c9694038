"""The fuzz harnesses of tests/fuzz/ (libFuzzer targets for `make fuzz`), built here without
libFuzzer (-DFUZZ_REPLAY: a main() that runs each file once) under ASan/UBSan. Every committed
seed and every regression input (an input `make fuzz` once crashed on, fixed since) goes through
its harness with no sanitizer report; the model and state seeds load and compute (they are
valid files, so mutations start from inputs that reach the forward pass), and a damaged one is
refused."""
import glob
import os
import subprocess

import pytest
from conftest import ROOT

FUZZ = os.path.join(ROOT, "tests", "fuzz")
HARNESSES = ["model", "tokenizer", "text", "cli", "sample", "state"]
ENV = dict(os.environ, LONGRUN_FUZZ_TOKENIZER=os.path.join(FUZZ, "text-tokenizer.bin"),
           LONGRUN_FUZZ_MODEL=os.path.join(FUZZ, "seeds", "model", "llama-f32.bin"))


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    out = {}
    for h in HARNESSES:
        out[h] = str(d / f"replay_{h}")
        cmd = [os.environ.get("CC", "cc"), "-DFUZZ_REPLAY", "-O1", "-g",
               "-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all", "-std=c11", "-Wall", "-Wextra", "-Werror", "-o", out[h],
               os.path.join(FUZZ, f"fuzz_{h}.c"), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return out


def inputs(h):
    seeds = sorted(glob.glob(os.path.join(FUZZ, "seeds", h, "*")))
    assert seeds, f"no seeds for {h}: run tests/fuzz/make_seeds.py"
    return seeds, sorted(glob.glob(os.path.join(FUZZ, "regressions", h, "*")))


def replay_files(binary, files):
    r = subprocess.run([binary, *files], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-3000:]
    done = [line for line in r.stdout.splitlines() if ": ok (die " in line]
    assert len(done) == len(files), r.stdout[-3000:]
    return {line.split(": ok (die ")[0]: int(line.split(": ok (die ")[1].rstrip(")")) for line in done}


@pytest.mark.parametrize("h", HARNESSES)
def test_seeds_and_regressions_replay_clean(replay, h):
    seeds, regressions = inputs(h)
    codes = replay_files(replay[h], seeds + regressions)
    print(f"\n[fuzz {h}] {len(seeds)} seeds, {len(regressions)} regression inputs, clean")
    if h in ("model", "state"):
        assert all(codes[s] == 0 for s in seeds), codes   # each seed loads and runs its forward passes


@pytest.mark.parametrize("h", ["model", "state"])
def test_replay_sees_a_refused_file(replay, tmp_path, h):
    seed = inputs(h)[0][0]
    bad = tmp_path / "cut.bin"
    bad.write_bytes(open(seed, "rb").read()[:1000])
    assert replay_files(replay[h], [str(bad)]) == {str(bad): 1}
