"""The KV cache's storage types, element by element, through tests/kv_driver.c (run.c's own
functions): half floats against numpy's IEEE binary16 conversions (round to nearest even), and
q8 (int8 per head vector with scale max|x| / 127) against the rule written out here."""
import os
import subprocess

import numpy as np
import pytest
from conftest import ROOT


@pytest.fixture(scope="module", params=[["-O2"], ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]],
                ids=["plain", "asan"])
def driver(request, tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("kv") / "kv_driver")
    r = subprocess.run([os.environ.get("CC", "cc"), "-std=c11", "-Wall", "-Wextra", "-Werror", *request.param, "-o", exe,
                        os.path.join(ROOT, "tests", "kv_driver.c"), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, f"compiling kv_driver.c failed:\n{r.stderr}"
    return exe


def call(driver, *args, stdin=""):
    r = subprocess.run([driver, *args], input=stdin, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_every_half_to_float(driver):
    got = np.array([int(x, 16) for x in call(driver, "h2f")], dtype=np.uint32).view(np.float32)
    want = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all()
    assert (got[~nan].view(np.uint32) == want[~nan].view(np.uint32)).all()   # bit for bit, signed zeros too
    print(f"\n[f16 -> f32] all 65536 halves bit-exact ({nan.sum()} nans stay nan)")


def test_float_to_half_rounds_as_ieee(driver):
    rng = np.random.default_rng(0)
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    finite = halves[np.isfinite(halves)]
    ties = (finite[:-1].astype(np.float64) + finite[1:]) / 2          # halfway between neighbours (where exact)
    edges = np.array([65504, 65519.99, 65520, 1e9, 2**-24, 2**-25, 2**-25 * 1.0001, 2**-14, 2**-14 * (1 - 2**-11),
                      0.0, -0.0, np.inf, -np.inf], dtype=np.float64)
    values = np.concatenate([finite, ties.astype(np.float32), edges.astype(np.float32),
                             rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    values = values[~np.isnan(values)]
    stdin = "\n".join(f"{b:08x}" for b in values.view(np.uint32))
    got = np.array([int(x, 16) for x in call(driver, "f2h", stdin=stdin)], dtype=np.uint16)
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).view(np.uint16)
    bad = np.flatnonzero(got != want)
    print(f"\n[f32 -> f16] {len(values)} floats (every half, every tie, random bits): {len(bad)} differ from numpy")
    assert not len(bad), [(float(values[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]


def test_q8_head_vectors(driver):
    rng = np.random.default_rng(1)
    H = 24
    x = np.concatenate([rng.normal(0, s, (40, H)) for s in (1e-3, 1, 300)]).astype(np.float32)
    x[0] = 0                                                            # an all-zero head vector
    got = np.array(call(driver, "q8", str(H), stdin="\n".join(f"{v:.9g}" for v in x.ravel())), dtype=np.float32)
    d = np.abs(x).max(1, keepdims=True) / np.float32(127)
    q = np.rint(x / np.where(d > 0, d, 1))
    want = (d * q).astype(np.float32)
    assert np.abs(got.reshape(x.shape) - want).max() <= 1e-6 * np.abs(x).max()
    err = np.abs(got.reshape(x.shape) - x).max(1) / np.abs(x).max(1).clip(1e-30)
    print(f"\n[q8] worst error per head vector {err.max():.3g} of its max |x| (bound 1/254 = {1 / 254:.3g})")
    assert err.max() <= 1 / 254 + 1e-6 and (got.reshape(x.shape)[0] == 0).all()
