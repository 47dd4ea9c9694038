"""Bad model files get one `error:` line naming the problem and exit code 1 from the ASan/UBSan
build: never a crash, a sanitizer report or a silent wrong answer."""
import os
import struct
import sys

import pytest
import torch
from conftest import ROOT, RUN_ASAN, export, need, run

sys.path.insert(0, ROOT)
import export as ex  # noqa: E402  (the field lists that mirror model.h)


def field_offset(fields, name):
    off = 0
    for n, code in fields:
        if n == name:
            return off, "<" + code
        off += struct.calcsize("<" + code)
    raise KeyError(name)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("malformed")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(d / "hf")
    path = export(d / "hf", d / "good.bin", "q8_0")
    return d, open(path, "rb").read()


def header_set(blob, name, value):
    off, fmt = field_offset(ex.HEADER_FIELDS, name)
    return blob[:off] + struct.pack(fmt, value) + blob[off + struct.calcsize(fmt):]


def tensor_set(blob, index, name, value):
    table = struct.unpack_from("<Q", blob, field_offset(ex.HEADER_FIELDS, "tensor_table_offset")[0])[0]
    off, fmt = field_offset(ex.TENSOR_FIELDS, name)
    off += table + index * ex.TENSOR.size
    return blob[:off] + struct.pack(fmt, value) + blob[off + struct.calcsize(fmt):]


def section_ends(blob):
    h = dict(zip([n for n, _ in ex.HEADER_FIELDS], ex.HEADER.unpack_from(blob)))
    return h["header_size"], h["tensor_table_offset"], h["tokenizer_offset"] or h["tensor_table_offset"]


CASES = {
    # name: (how to damage the bytes, what the error must mention)
    "empty": (lambda b: b"", "too short"),
    "truncated_header": (lambda b: b[:100], "too short"),
    "truncated_layers": (lambda b: b[:section_ends(b)[0] + 10], "bytes"),
    "truncated_table": (lambda b: b[:section_ends(b)[1] + 40], "bytes"),
    "truncated_data": (lambda b: b[:len(b) - 1000], "bytes"),
    "truncated_keep_size": (lambda b: header_set(b[:len(b) - 1000], "file_size", len(b) - 1000), "past the end"),
    "wrong_magic": (lambda b: b"GGUF" + b[4:], "magic"),
    "future_version": (lambda b: header_set(b, "version", ex.LR_VERSION + 1), "version"),
    "header_size": (lambda b: header_set(b, "header_size", 200), "header size"),
    "n_layers_huge": (lambda b: header_set(b, "n_layers", 2**31), "n_layers"),
    "dim_huge": (lambda b: header_set(b, "dim", 2**31), "dim"),
    "vocab_huge": (lambda b: header_set(b, "vocab_size", 2**32 - 1), "vocab"),
    "heads_not_divisible": (lambda b: header_set(b, "n_kv_heads", 3), "multiple"),
    "head_dim_zero": (lambda b: header_set(b, "head_dim", 0), "head_dim"),
    "n_tensors_huge": (lambda b: header_set(b, "n_tensors", 2**31), "n_tensors"),
    "table_past_end": (lambda b: header_set(b, "tensor_table_offset", 2**63), "tensor table"),
    "tensor_offset_past_end": (lambda b: tensor_set(b, 0, "offset", len(b) + 64 * 10), "past the end"),
    "tensor_offset_overflow": (lambda b: tensor_set(b, 1, "offset", 2**64 - 64), "past the end"),
    "tensor_size_wrong": (lambda b: tensor_set(b, 1, "size", 12), "needs"),
    "tensor_misaligned": (lambda b: tensor_set(b, 1, "offset", struct.unpack_from(
        "<Q", b, section_ends(b)[1] + ex.TENSOR.size + field_offset(ex.TENSOR_FIELDS, "offset")[0])[0] + 4), "aligned"),
    "tensor_overlap": (lambda b: tensor_set(b, 2, "offset", struct.unpack_from(
        "<Q", b, section_ends(b)[1] + ex.TENSOR.size + field_offset(ex.TENSOR_FIELDS, "offset")[0])[0]), "overlap"),
    "tensor_bad_dtype": (lambda b: tensor_set(b, 0, "dtype", 99), "dtype"),
    "tensor_huge_rows": (lambda b: tensor_set(b, 0, "rows", 2**62), "shape"),
    "tensor_missing": (lambda b: tensor_set(b, 3, "name", b"blk.0.nothing"), "missing"),
    "tensor_wrong_shape": (lambda b: tensor_set(b, 0, "rows", 255), "needs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_refused(good, case):
    d, blob = good
    damage, words = CASES[case]
    path = d / f"{case}.bin"
    path.write_bytes(damage(blob))
    r = run(path, "-m", "logits", "-i", "1 2 3", "--logits-out", d / "l.f32", binary=need(RUN_ASAN, "make run-asan"),
            check=False)
    assert r.returncode == 1, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert words in lines[0], lines[0]
    print(f"\n[{case}] {lines[0]}")


def test_good_file_runs_under_sanitizers(good):
    d, _ = good
    run(d / "good.bin", "-m", "logits", "-i", "1 2 3", "--logits-out", d / "l.f32", binary=need(RUN_ASAN, "make run-asan"))


@pytest.mark.parametrize("args,words", [
    (["/nonexistent/model.bin"], "cannot open"),
    ([os.path.dirname(__file__)], "not a regular file"),
])
def test_bad_paths(args, words):
    r = run(args[0], "-m", "logits", "-i", "1", "--logits-out", "/dev/null", binary=need(RUN_ASAN, "make run-asan"),
            check=False)
    assert r.returncode == 1 and r.stderr.startswith("error:") and words in r.stderr, r.stderr


def test_token_id_out_of_range(good):
    d, _ = good
    r = run(d / "good.bin", "-m", "logits", "-i", "1 256", "--logits-out", d / "l.f32",
            binary=need(RUN_ASAN, "make run-asan"), check=False)
    assert r.returncode == 1 and "outside the vocabulary" in r.stderr, r.stderr
