"""Bad model files get one `error:` line naming the problem and exit code 1 from the ASan/UBSan
build: never a crash, a sanitizer report or a silent wrong answer."""
import os
import struct
import sys

import pytest
from conftest import ROOT, RUN_ASAN, export, field_offset, need, run, tiny_llama

sys.path.insert(0, ROOT)
import export as ex  # noqa: E402  (the field lists that mirror model.h)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("malformed")
    path = export(tiny_llama(d / "hf"), d / "good.bin", "q8_0")
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


def layer_set(blob, layer, name, value):
    off, fmt = field_offset(ex.LAYER_FIELDS, name)
    off += struct.unpack_from("<I", blob, field_offset(ex.HEADER_FIELDS, "header_size")[0])[0] + layer * ex.LAYER.size
    return blob[:off] + struct.pack(fmt, value) + blob[off + struct.calcsize(fmt):]


def tensor_index(blob, wanted):
    table = section_ends(blob)[1]
    n = struct.unpack_from("<I", blob, field_offset(ex.HEADER_FIELDS, "n_tensors")[0])[0]
    names = [ex.TENSOR.unpack_from(blob, table + i * ex.TENSOR.size)[0].rstrip(b"\0").decode() for i in range(n)]
    return names.index(wanted)


def vector_as_f16(b):
    """blk.0.attn_norm stored as f16 with a consistent size: only the 'vectors are f32' rule refuses it."""
    i = tensor_index(b, "blk.0.attn_norm")
    return tensor_set(tensor_set(b, i, "dtype", 1), i, "size", 2 * 64)


CASES = {
    # name: (how to damage the bytes, what the error must mention)
    "empty": (lambda b: b"", "too short"),
    "truncated_header": (lambda b: b[:100], "too short"),
    "truncated_layers": (lambda b: b[:section_ends(b)[0] + 10], "bytes"),
    "truncated_table": (lambda b: b[:section_ends(b)[1] + 40], "bytes"),
    "truncated_data": (lambda b: b[:len(b) - 1000], "bytes"),
    "truncated_keep_size": (lambda b: header_set(b[:len(b) - 1000], "file_size", len(b) - 1000), "past the end"),
    # cut inside the layer configs / tensor table with file_size fixed up: the section checks must catch it
    "truncated_layers_keep_size": (lambda b: header_set(b[:section_ends(b)[0] + 10], "file_size",
                                                        section_ends(b)[0] + 10), "layer table"),
    "truncated_table_keep_size": (lambda b: header_set(b[:section_ends(b)[1] + 40], "file_size",
                                                       section_ends(b)[1] + 40), "tensor table"),
    "wrong_magic": (lambda b: b"GGUF" + b[4:], "magic"),
    "future_version": (lambda b: header_set(b, "version", ex.LR_VERSION + 1), "version"),
    "header_size": (lambda b: header_set(b, "header_size", 200), "header size"),
    "n_layers_huge": (lambda b: header_set(b, "n_layers", 2**31), "n_layers"),
    "dim_huge": (lambda b: header_set(b, "dim", 2**31), "dim"),
    "vocab_huge": (lambda b: header_set(b, "vocab_size", 2**32 - 1), "vocab_size"),
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
    # the header's file size disagrees with an intact file, in both directions
    "file_size_too_big": (lambda b: header_set(b, "file_size", len(b) + 64), "header says"),
    "trailing_bytes": (lambda b: b + bytes(64), "header says"),
    "tokenizer_misaligned": (lambda b: header_set(header_set(b, "tokenizer_offset", 132), "tokenizer_size", 64),
                             "aligned"),
    "tokenizer_past_end": (lambda b: header_set(header_set(b, "tokenizer_offset", len(b) - 8), "tokenizer_size", 64),
                           "tokenizer section"),
    # zero or absurd dimensions: each would divide by zero, allocate nothing or overflow later
    "n_kv_heads_zero": (lambda b: header_set(b, "n_kv_heads", 0), "n_kv_heads"),
    "max_seq_len_zero": (lambda b: header_set(b, "max_seq_len", 0), "max_seq_len"),
    "q_dim_huge": (lambda b: header_set(b, "head_dim", 2**20), "too large"),
    "norm_eps_nan": (lambda b: header_set(b, "norm_eps", float("nan")), "norm_eps"),
    "qkv_bias_without_tensors": (lambda b: header_set(b, "qkv_bias", 1), "missing"),
    # layer configs
    "layer_bad_attn_kind": (lambda b: layer_set(b, 1, "attn_kind", 7), "attention kind"),
    "layer_window_zero": (lambda b: layer_set(layer_set(b, 1, "attn_kind", 1), 1, "window", 0), "window 0"),
    "layer_bad_rope_type": (lambda b: layer_set(b, 0, "rope_type", 99), "rope type"),
    "layer_rotary_odd": (lambda b: layer_set(b, 1, "rotary_dim", 15), "rotary_dim"),
    "layer_rotary_too_big": (lambda b: layer_set(b, 0, "rotary_dim", 18), "rotary_dim"),
    "layer_theta_nan": (lambda b: layer_set(b, 0, "rope_theta", float("nan")), "rope_theta"),
    # tensor table entries
    "tensor_name_unterminated": (lambda b: tensor_set(b, 2, "name", b"x" * 40), "name"),
    "tensor_bad_ndims": (lambda b: tensor_set(b, 2, "n_dims", 3), "shape"),
    "vector_not_f32": (vector_as_f16, "must be f32"),
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


def test_huge_window_is_full_attention(good):
    """A sliding window of 2^32-1 keys on every layer (no overflow in q - k < window) equals full attention."""
    d, blob = good
    for layer in range(2):
        blob = layer_set(layer_set(blob, layer, "attn_kind", 1), layer, "window", 2**32 - 1)
    (d / "wide.bin").write_bytes(blob)
    asan = need(RUN_ASAN, "make run-asan")
    ids = " ".join(str(i) for i in range(0, 256, 7))
    run(d / "good.bin", "-m", "logits", "-i", ids, "--logits-out", d / "full.f32", "--chunk", 5, binary=asan)
    run(d / "wide.bin", "-m", "logits", "-i", ids, "--logits-out", d / "wide.f32", "--chunk", 5, binary=asan)
    assert (d / "full.f32").read_bytes() == (d / "wide.f32").read_bytes()


# ----------------------------------------------------------------------------
# The rest of the malformed-input corpus: a file cut at every section boundary, damaged
# vocabularies, and bad prompts and options, on the tiny model that carries a tokenizer
# (a committed fuzz seed), through the ASan/UBSan build.

SEED = os.path.join(ROOT, "tests", "fuzz", "seeds", "model", "llama-tokenizer.bin")


def one_error_line(r, code, words):
    assert r.returncode == code, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()   # chat has printed the start-up block before it reads a line
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and words in errors[0], r.stderr
    return errors[0]


def boundaries(blob):
    """Every offset where one part of the file ends and the next begins, before the last byte of data."""
    h = dict(zip([n for n, _ in ex.HEADER_FIELDS], ex.HEADER.unpack_from(blob)))
    cuts = {h["header_size"], h["header_size"] + h["n_layers"] * ex.LAYER.size, h["tensor_table_offset"],
            h["tensor_table_offset"] + h["n_tensors"] * ex.TENSOR.size, h["tokenizer_offset"],
            h["tokenizer_offset"] + h["tokenizer_size"]}
    ends = [h["tokenizer_offset"] + h["tokenizer_size"]]
    for i in range(h["n_tensors"]):
        e = dict(zip([n for n, _ in ex.TENSOR_FIELDS], ex.TENSOR.unpack_from(blob, h["tensor_table_offset"] + i * ex.TENSOR.size)))
        cuts |= {e["offset"], e["offset"] + e["size"]}
        ends.append(e["offset"] + e["size"])
    return sorted(c for c in cuts if 0 < c < max(ends))


@pytest.mark.parametrize("fix_size", [False, True], ids=["as_cut", "file_size_fixed"])
def test_cut_at_every_section_boundary(tmp_path, fix_size):
    blob = open(need(SEED, "tests/fuzz/make_seeds.py writes it"), "rb").read()
    asan = need(RUN_ASAN, "make run-asan")
    cuts = boundaries(blob)
    assert len(cuts) >= 12, cuts   # header, layers, table, tokenizer and ~10 tensors
    seen = set()
    for cut in cuts:
        data = blob[:cut]
        if fix_size and cut >= ex.HEADER.size:
            data = header_set(data, "file_size", cut)
        (tmp_path / "cut.bin").write_bytes(data)
        r = run(tmp_path / "cut.bin", "-m", "tokenize", "-i", "hi", binary=asan, check=False)
        seen.add(one_error_line(r, 1, "").split(": ", 2)[-1][:40])
    print(f"\n[cut] {len(cuts)} cuts, {len(seen)} distinct messages, e.g. {sorted(seen)[:3]}")


def tokenizer_entry_set(blob, token, offset=None, length=None):
    """Rewrite TokEntry `token` (offset, len) in the tokenizer section (model.h layout)."""
    h = dict(zip([n for n, _ in ex.HEADER_FIELDS], ex.HEADER.unpack_from(blob)))
    entries = h["tokenizer_offset"] + struct.unpack_from("<Q", blob, h["tokenizer_offset"] + 64)[0]
    at = entries + 16 * token
    old_off, old_len = struct.unpack_from("<II", blob, at)
    packed = struct.pack("<II", old_off if offset is None else offset, old_len if length is None else length)
    return blob[:at] + packed + blob[at + 8:]


def tokenizer_entry(blob, token):
    h = dict(zip([n for n, _ in ex.HEADER_FIELDS], ex.HEADER.unpack_from(blob)))
    entries = h["tokenizer_offset"] + struct.unpack_from("<Q", blob, h["tokenizer_offset"] + 64)[0]
    return struct.unpack_from("<II", blob, entries + 16 * token)


@pytest.mark.parametrize("case,damage,words", [
    ("empty_piece", lambda b: tokenizer_entry_set(b, 300, length=0), "token 300 is empty"),
    ("duplicate_piece", lambda b: tokenizer_entry_set(b, 301, *tokenizer_entry(b, 300)), "same string"),
    ("piece_outside_strings", lambda b: tokenizer_entry_set(b, 5, offset=2**31), "outside the string table"),
])
def test_bad_vocabulary(tmp_path, case, damage, words):
    blob = open(need(SEED, "tests/fuzz/make_seeds.py writes it"), "rb").read()
    (tmp_path / "v.bin").write_bytes(damage(blob))
    r = run(tmp_path / "v.bin", "-m", "tokenize", "-i", "hi", binary=need(RUN_ASAN, "make run-asan"), check=False)
    print(f"\n[{case}] {one_error_line(r, 1, words)}")


def run_bytes(args, input=None, binary=None):
    """./run with arguments that may hold any bytes (argv is bytes on Linux)."""
    import subprocess
    r = subprocess.run([binary or need(RUN_ASAN, "make run-asan"), SEED, *args], input=input, capture_output=True)
    r.stderr = r.stderr.decode("utf-8", "replace")
    return r


@pytest.mark.parametrize("case,args,stdin,code,words", [
    ("invalid_utf8_arg", [b"-i", b"caf\xe9 au lait", b"-n", b"2"], None, 1, "not valid UTF-8 (byte 3 is 0xE9)"),
    ("invalid_utf8_stdin", [b"-f", b"-", b"-n", b"2"], b"ok \xed\xa0\x80 surrogate", 1, "not valid UTF-8 (byte 3 is 0xED)"),
    ("truncated_utf8", [b"-m", b"tokenize", b"-f", b"-"], b"end \xe2\x82", 1, "not valid UTF-8 (byte 4"),
    ("chat_invalid_line", [b"-m", b"chat", b"-n", b"2"], b"\xffhello\n", 1, "chat line is not valid UTF-8"),
    ("prompt_is_directory", [b"-f", b"/tmp", b"-n", b"2"], None, 1, "is a directory"),
    ("empty_prompt", [b"-i", b"", b"-n", b"2"], None, 1, "the prompt is empty"),
    ("empty_prompt_file", [b"-f", b"/dev/null", b"-n", b"2"], None, 1, "the prompt is empty"),
    ("n_zero", [b"-i", b"hi", b"-n", b"0"], None, 2, "-n 0 generates nothing"),
    ("bad_ids", [b"--ids", b"-i", b"1 2 x", b"-n", b"2"], None, 1, "is not a token id"),
    ("id_past_vocab", [b"--ids", b"-i", b"1 320", b"-n", b"2"], None, 1, "outside the vocabulary"),
    ("id_negative", [b"--ids", b"-i", b"1 -5", b"-n", b"2"], None, 1, "is not a token id"),
    ("nul_in_ids", [b"--ids", b"-f", b"-", b"-n", b"2"], b"1 2\x003 4", 1, "byte 3 is a NUL byte"),
])
def test_bad_prompt(case, args, stdin, code, words):
    print(f"\n[{case}] {one_error_line(run_bytes(args, stdin), code, words)}")


def test_context_larger_than_memory():
    """-c beyond what the process may hold: calloc fails and says so (the plain build: ASan's
    allocator would report the size itself instead of returning NULL). The address-space limit
    makes the failure certain whatever the machine's memory and overcommit policy."""
    import resource
    import subprocess
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))   # noqa: E731
    r = subprocess.run([need(os.path.join(ROOT, "run"), "make"), SEED, "-i", "hi", "-n", "2", "-c", "2000000000"],
                       capture_output=True, text=True, preexec_fn=limit)
    print(f"\n[huge -c] {one_error_line(r, 1, 'cannot allocate')}")


def test_names_from_the_file_cannot_reach_the_terminal(good):
    """A tensor name with an escape byte is refused, its bytes shown as \\xHH; an arch string with
    control bytes is printed the same way in the start-up block."""
    d, blob = good
    (d / "esc.bin").write_bytes(tensor_set(blob, 3, "name", b"blk.0.\x1b[31mwq"))
    r = run(d / "esc.bin", "-m", "logits", "-i", "1 2", "--logits-out", d / "l.f32",
            binary=need(RUN_ASAN, "make run-asan"), check=False)
    line = one_error_line(r, 1, "control or non-ASCII byte: blk.0.\\x1B[31mwq")
    assert "\x1b" not in r.stderr, line
    off = field_offset(ex.HEADER_FIELDS, "arch")[0]
    arch = blob[:off] + b"lla\x1b]0;owned\x07ma".ljust(32, b"\0") + blob[off + 32:]
    (d / "arch.bin").write_bytes(arch)
    r = run(d / "arch.bin", "-m", "logits", "-i", "1 2", "--logits-out", d / "l.f32",
            binary=need(RUN_ASAN, "make run-asan"))
    assert "lla\\x1B]0;owned\\x07ma" in r.stderr and "\x1b" not in r.stderr, r.stderr


def test_text_without_tokenizer(good):
    d, _ = good
    r = run(d / "good.bin", "-i", "hello", "-n", 2, binary=need(RUN_ASAN, "make run-asan"), check=False)
    print(f"\n[no tokenizer] {one_error_line(r, 1, 'has no tokenizer')}")


# ----------------------------------------------------------------------------
# Crafted files that once got through the checks: each is made from a committed fuzz seed, is
# itself committed under tests/fuzz/regressions/model/ (so the fuzz replay runs it too), and
# must be refused with one error line naming what is wrong.

SEEDS = os.path.join(ROOT, "tests", "fuzz", "seeds", "model")
REGRESSIONS = os.path.join(ROOT, "tests", "fuzz", "regressions", "model")
NAN = float("nan")


def layers_set(blob, layer, **fields):
    for name, value in fields.items():
        blob = layer_set(blob, layer, name, value)
    return blob


def as_rope_lists(blob):
    """qwen2-q8 (2 layers) with its biases dropped and blk.0.bk / blk.1.bk (f32, 16 x 1) turned
    into the LongRoPE lists, 4 factors of 1.0 each; layer 0 rotates 4 pairs, layer 1 8 pairs."""
    blob = header_set(blob, "qkv_bias", 0)
    table = section_ends(blob)[1]
    for old, new in [("blk.0.bk", b"rope.short_factor"), ("blk.1.bk", b"rope.long_factor")]:
        i = tensor_index(blob, old)
        entry = dict(zip([n for n, _ in ex.TENSOR_FIELDS], ex.TENSOR.unpack_from(blob, table + i * ex.TENSOR.size)))
        blob = tensor_set(tensor_set(tensor_set(blob, i, "name", new), i, "rows", 4), i, "size", 16)
        blob = blob[:entry["offset"]] + struct.pack("<4f", 1, 1, 1, 1) + blob[entry["offset"] + 16:]
    longrope = dict(rope_type=5, factor=2.0, orig_ctx=32, attention_factor=0.0)
    return layers_set(layers_set(blob, 0, rotary_dim=8, **longrope), 1, rotary_dim=16, **longrope)


def without_text_tokens(blob):
    """llama-tokenizer with no merges and every ordinary token emptied (type unused): it loads,
    and any text, the pass-key filler included, encodes to no tokens at all."""
    h = dict(zip([n for n, _ in ex.HEADER_FIELDS], ex.HEADER.unpack_from(blob)))
    tok = h["tokenizer_offset"]
    n_tokens, = struct.unpack_from("<I", blob, tok + 24)
    entries, = struct.unpack_from("<Q", blob, tok + 64)
    out = bytearray(blob)
    struct.pack_into("<I", out, tok + 28, 0)   # n_merges
    for i in range(n_tokens):
        at = tok + entries + 16 * i
        offset, length, score, kind = struct.unpack_from("<IIfI", out, at)
        if kind not in (3, 4):   # control and user-defined tokens stay
            struct.pack_into("<IIfI", out, at, offset, 0, score, 5)
    return bytes(out)


YARN = dict(rope_type=3, factor=4.0, orig_ctx=32, beta_fast=32.0, beta_slow=1.0)
CRAFTED = {
    # name: (seed, damage, mode arguments, words of the error)
    "yarn-mscale-nan": ("qwen3-f16.bin", lambda b: layers_set(b, 0, mscale=NAN, mscale_all_dim=1.0, **YARN),
                        [], "attention factor works out to nan"),
    "yarn-mscale-ratio-huge": ("qwen3-f16.bin", lambda b: layers_set(b, 0, mscale=1e30, mscale_all_dim=1e-30,
                                                                       **YARN), [], "attention factor works out"),
    "nope-layer-factor-nan": ("llama-f32.bin", lambda b: layers_set(b, 0, rotary_dim=0, rope_type=1, factor=NAN,
                                                                      orig_ctx=64), [], "needs a factor"),
    "nope-layer-factor-huge": ("llama-f32.bin", lambda b: layers_set(b, 0, rotary_dim=0, rope_type=1, factor=1e30,
                                                                       orig_ctx=64), [], "needs a factor"),
    "longrope-lists-too-short": ("qwen2-q8.bin", as_rope_lists, [], "LongRoPE factor lists hold 4"),
    "passkey-filler-no-tokens": ("llama-tokenizer.bin", without_text_tokens,
                                 ["-m", "passkey", "--passkey-len", "64", "--passkey-trials", "1"],
                                 "filler text into no tokens"),
}
LOGITS_ARGS = ["-m", "logits", "-i", "1 2 3", "--logits-out", "/dev/null"]


def crafted_bytes(name):
    seed, damage, _, _ = CRAFTED[name]
    return damage(open(os.path.join(SEEDS, seed), "rb").read())


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_file_is_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(crafted_bytes(name))
    args = CRAFTED[name][2] or LOGITS_ARGS
    r = run(path, *args, binary=need(RUN_ASAN, "make run-asan"), check=False)
    print(f"\n[{name}] {one_error_line(r, 1, CRAFTED[name][3])}")


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_file_is_in_the_fuzz_corpus(name):
    """The committed regression input is exactly what CRAFTED builds (rewrite it if not:
    python -c 'from test_malformed import write_crafted; write_crafted()' in tests/)."""
    path = need(os.path.join(REGRESSIONS, name), "write_crafted() writes it")
    assert open(path, "rb").read() == crafted_bytes(name)


def write_crafted():
    for name in CRAFTED:
        with open(os.path.join(REGRESSIONS, name), "wb") as f:
            f.write(crafted_bytes(name))
