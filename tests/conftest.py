"""Shared helpers: where the binaries are, exporting, running ./run, reading logits."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.environ.get("LONGRUN_BIN", os.path.join(ROOT, "run"))
RUN_ASAN = os.environ.get("LONGRUN_ASAN_BIN", os.path.join(ROOT, "run-asan"))
SMOLLM2_GGUF = os.environ.get("SMOLLM2_GGUF", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
PYTHON = os.environ.get("LONGRUN_PYTHON", sys.executable)   # the Python that runs export.py
DTYPE_NAMES = ["f32", "f16", "bf16", "q8_0"]                 # model.h DType, by value


def need(path, how):
    """A missing prerequisite fails the test (make test always provides it), never skips it."""
    assert os.path.exists(path), f"{path} is missing: {how}"
    return path


def export(source, out, dtype="f32", *extra):
    script = need(os.path.join(ROOT, "export.py"), "export.py is part of the repo")
    r = subprocess.run([PYTHON, script, str(source), str(out), "--dtype", dtype, *extra], capture_output=True, text=True)
    assert r.returncode == 0, f"export.py failed: {r.stderr}"
    return str(out)


def tiny_llama(path, **config):
    """A random-init Llama (seed 0) saved with save_pretrained at path: 2 layers, GQA 4/2, width 64,
    vocab 256, unless config says otherwise. Returns path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    LlamaForCausalLM(LlamaConfig(**{**shape, **config})).save_pretrained(path)
    return path


def stored_dtypes(model):
    """{tensor name: (dtype name, rows, cols)} read from a model file's tensor table (model.h layout)."""
    with open(model, "rb") as f:
        blob = f.read()
    n_tensors, table = struct.unpack_from("<IQ", blob, 60)   # FileHeader.n_tensors, .tensor_table_offset
    out = {}
    for i in range(n_tensors):
        name, dtype, _, rows, cols = struct.unpack_from("<40sIIQQ", blob, table + 80 * i)
        out[name.rstrip(b"\0").decode()] = (DTYPE_NAMES[dtype], rows, cols)
    return out


def field_offset(fields, name):
    """(offset, struct format) of field `name` in a struct given as (name, struct code) pairs in
    order (model.h's structs: no padding)."""
    off = 0
    for n, code in fields:
        if n == name:
            return off, "<" + code
        off += struct.calcsize("<" + code)
    raise KeyError(name)


def plant_tmp(out, kind):
    """Put a file ("file") or a symlink to one ("symlink") at OUT.tmp, a name temporaries once
    had, holding "keep me". Returns a check that nothing was written through it."""
    precious = f"{out}.precious"
    with open(precious, "w") as f:
        f.write("keep me")
    if kind == "file":
        os.link(precious, f"{out}.tmp")
    else:
        os.symlink(precious, f"{out}.tmp")

    def untouched():
        return open(precious).read() == "keep me" and open(f"{out}.tmp").read() == "keep me"
    return untouched


def run(model, *args, binary=None, check=True, **kw):
    """Run ./run MODEL ARGS; returns the CompletedProcess (text mode)."""
    binary = binary or need(RUN, "build it with make")
    r = subprocess.run([binary, str(model), *map(str, args)], capture_output=True, text=True, **kw)
    if check:
        assert r.returncode == 0, f"run failed ({r.returncode}): {r.stderr}"
    return r


def engine_logits(model, ids, tmp_path, chunk=None, binary=None, extra=()):
    """Logits (n, vocab) of every position, from ./run -m logits (extra: more options)."""
    out = os.path.join(str(tmp_path), f"logits_{chunk}.f32")
    args = ["-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", out, *extra]
    if chunk:
        args += ["--chunk", chunk]
    run(model, *args, binary=binary)
    return np.fromfile(out, dtype="<f4").reshape(len(ids), -1)


@pytest.fixture(scope="session")
def smollm2_gguf():
    return need(SMOLLM2_GGUF, "make test downloads it (or set SMOLLM2_GGUF)")
