"""Bad state files (--load-state) and failed saves (--save-state) under the ASan/UBSan build:
one `error:` line naming the problem and exit code 1 (die()), never a crash or a sanitizer
report; a save that fails or is killed half-way leaves the previous state file as it was.

The model is a tiny random Llama (conftest.tiny_llama) with a byte-level BPE tokenizer and a
ChatML template (tests/fuzz/make_seeds.py trains it), so that chat can load states too; "another
model" is the same shapes and tokenizer with other random weights. The state file's layout is
model.h's StateHeader, read here with struct."""
import json
import os
import resource
import signal
import struct
import sys

import pytest
from conftest import ROOT, RUN_ASAN, export, field_offset, need, run, tiny_llama

sys.path.insert(0, os.path.join(ROOT, "tests", "fuzz"))
import make_seeds  # noqa: E402  (the byte-level tokenizer of the fuzz seeds)

TEXT = "Hello world, this is a tiny corpus for a tiny tokenizer."
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"

# model.h StateHeader (version 4): (name, struct code) in order, then sections[13] of
# (offset, size).
HEADER_FIELDS = [("magic", "I"), ("version", "I"), ("model_fingerprint", "Q"), ("file_size", "Q"),
                 ("n_layers", "I"), ("vocab_size", "I"), ("kv_type", "I"), ("lminf", "I"),
                 ("n_sink", "Q"), ("window", "Q"), ("limit", "Q"), ("context", "Q"), ("max_T", "I"),
                 ("sink_kind", "I"), ("n_slots", "Q"), ("max_sink", "Q"), ("kv_dim", "Q"),
                 ("row_bytes", "Q"), ("n_tokens", "Q"), ("kind", "I"), ("chat_template", "I"),
                 ("n_kv_heads", "I"), ("head_dim", "I"),
                 ("memory", "I"), ("memory_block", "I"), ("memory_blocks", "I"),
                 ("memory_distance", "I"), ("memory_positions", "Q")]
SECTIONS = ["layer_config", "slots", "rope_len", "tokens", "logits", "sink_keys", "sink_values",
            "keys", "values", "mem_keys", "mem_values", "mem_bounds", "mem_bound_scales"]
SECTIONS_AT = 160
HEADER_SIZE = SECTIONS_AT + 16 * len(SECTIONS)   # 368
MEMORY = ["--window", 8, "--sinks", 2, "--memory", "--memory-block", 4, "--memory-blocks", 2]


def field(name):
    """(offset, struct format) of a StateHeader field."""
    return field_offset(HEADER_FIELDS, name)


def header(blob):
    return {n: struct.unpack_from(field(n)[1], blob, field(n)[0])[0] for n, _ in HEADER_FIELDS}


def sections(blob):
    """{name: (offset, size)} from the header's section table."""
    at = SECTIONS_AT
    return {n: struct.unpack_from("<QQ", blob, at + 16 * i) for i, n in enumerate(SECTIONS)}


def patch(blob, at, fmt, value):
    return blob[:at] + struct.pack(fmt, value) + blob[at + struct.calcsize(fmt):]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two exports of the same tiny shapes and tokenizer: "a", and "b" with other weights."""
    d = tmp_path_factory.mktemp("state_errors")
    tok = make_seeds.byte_level_json()
    out = {}
    for name, extra in [("a", {}), ("b", {"initializer_range": 0.03})]:   # same seed, other scale
        hf = tiny_llama(d / name, vocab_size=320, **extra)
        (hf / "tokenizer.json").write_text(json.dumps(tok))
        (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                              "chat_template": CHATML}))
        out[name] = export(hf, d / f"{name}.bin")
    return out


def asan(model, *args, **kw):
    return run(model, *args, binary=need(RUN_ASAN, "make run-asan"), check=False, **kw)


def clean(r):
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-3000:]
    return r


def refused(r, *words):
    """Exit code 1 and exactly one error line, the last one, holding each of words."""
    clean(r)
    lines = r.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and lines[-1] == errors[0], \
        f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


def save(model, path, *options):
    r = asan(model, "-i", TEXT, "-n", 1, "-t", 0, "--save-state", path, *options)
    assert clean(r).returncode == 0, r.stderr
    return open(path, "rb").read()


def load(model, path, *options, **kw):
    return asan(model, "--load-state", path, "-n", 2, "-t", 0, *options, **kw)


@pytest.fixture(scope="module")
def state(models, tmp_path_factory):
    """A state of TEXT (generate, -c 64 --chunk 4): its path and bytes; it loads."""
    path = tmp_path_factory.mktemp("state") / "good.state"
    blob = save(models["a"], path, "-c", 64, "--chunk", 4)
    assert clean(load(models["a"], path)).returncode == 0
    return path, blob


@pytest.fixture(scope="module")
def memory_state(models, tmp_path_factory):
    """A state of TEXT with a context memory (MEMORY, --kv-type f16, --chunk 4): its path and
    bytes; it loads."""
    path = tmp_path_factory.mktemp("memory_state") / "memory.state"
    blob = save(models["a"], path, *MEMORY, "--kv-type", "f16", "--chunk", 4)
    assert clean(load(models["a"], path, *MEMORY, "--kv-type", "f16")).returncode == 0
    return path, blob


def load_bytes(models, tmp_path, blob, *options):
    bad = tmp_path / "bad.state"
    bad.write_bytes(blob)
    return load(models["a"], bad, *options)


# ----------------------------------------------------------------------------
# Files that are not a whole state file

def test_layout_of_version_4(state, memory_state):
    """The header is 368 bytes, the sections follow it in order, each at the next 4096-byte
    boundary, as long as the counts say: without a memory its four sections are empty; with one,
    n_layers x n_tokens rows of row_bytes and ceil(n_tokens / B) blocks of 2 kv_dim int8 steps
    and n_kv_heads float scales."""
    for blob, memory in ((state[1], False), (memory_state[1], True)):
        h = header(blob)
        assert h["version"] == 4 and h["memory"] == memory, h
        assert h["n_kv_heads"] * h["head_dim"] == h["kv_dim"], h
        at = HEADER_SIZE
        for name, (off, size) in sections(blob).items():
            assert off == -(-at // 4096) * 4096, (name, off, at)
            at = off + size
        assert at == h["file_size"] == len(blob)
        n, L = h["n_tokens"], h["n_layers"]
        blocks = -(-n // 4) if memory else 0
        assert h["memory_positions"] == (n if memory else 0)
        assert (h["memory_block"], h["memory_blocks"]) == ((4, 2) if memory else (0, 0))
        rows = L * h["memory_positions"] * h["row_bytes"]
        bounds, scales = L * blocks * 2 * h["kv_dim"], L * blocks * h["n_kv_heads"] * 4
        got = [sections(blob)[k][1] for k in ("mem_keys", "mem_values", "mem_bounds",
                                              "mem_bound_scales")]
        assert got == [rows, rows, bounds, scales] and (not memory or rows > 0), (got, h)


@pytest.mark.parametrize("which", ["plain", "memory"])
def test_cut_at_every_section_boundary_is_refused(models, state, memory_state, tmp_path, which):
    """Cut at each section's start and end and inside the header: every cut is refused, by the
    header's length or by the file size the header records (a cut inside a hole too)."""
    path, blob = state if which == "plain" else memory_state
    options = [] if which == "plain" else [*MEMORY, "--kv-type", "f16"]
    cuts = {0, 4, 8, 100, SECTIONS_AT, HEADER_SIZE - 1, HEADER_SIZE}
    for off, size in sections(blob).values():
        cuts |= {off, off + size // 2, off + size}
    cuts.discard(len(blob))
    assert len(blob) == header(blob)["file_size"] and len(cuts) >= 25
    for cut in sorted(cuts):
        line = refused(load_bytes(models, tmp_path, blob[:cut], *options))
        assert ("too short" if cut < HEADER_SIZE else "truncated") in line, (cut, line)
        assert cut >= HEADER_SIZE or f"its header is {HEADER_SIZE} bytes" in line, line
    refused(load_bytes(models, tmp_path, blob + b"\0" * 4096, *options), "truncated or damaged")


def test_wrong_magic_and_version_are_refused(models, state, tmp_path):
    blob = state[1]
    refused(load_bytes(models, tmp_path, b"LRSX" + blob[4:]), "not a longrun state file")
    # 1: before the context memory's sections, 2: float32 bounds, 3: memory keys at angle 0
    for version in (1, 2, 3, 5):
        refused(load_bytes(models, tmp_path, patch(blob, 4, "<I", version)),
                f"version {version}; this longrun reads version 4", "save the state again")
    refused(load_bytes(models, tmp_path, b"\0" * len(blob)), "not a longrun state file")


def test_missing_or_not_a_file_is_refused(models, tmp_path):
    refused(load(models["a"], tmp_path / "none.state"), "cannot open")
    refused(load(models["a"], tmp_path), "not a regular file")


def test_another_models_state_is_refused(models, state):
    refused(load(models["b"], state[0]), "another model file")


# ----------------------------------------------------------------------------
# Settings that shaped the cache must be the saving run's, each named

SETTINGS = {   # name: (the saving run's options, the loading run's, what the message names)
    "kv-type": ([], ["--kv-type", "q8"], "--kv-type f32"),
    "window": (["--window", 8, "--sinks", 2], ["--window", 16, "--sinks", 2], "--window 8"),
    "sinks": (["--window", 8, "--sinks", 2], ["--window", 8, "--sinks", 3], "--sinks 2"),
    "lminf": (["--lminf", "--window", 8], ["--window", 8], "--lminf"),
    "lminf-limit": (["--lminf", "--window", 8, "--lminf-limit", 16], ["--lminf", "--window", 8],
                    "--lminf-limit 16"),
    "rope-scaling": (["--rope-scaling", "linear", "--rope-factor", 2],
                     ["--rope-scaling", "dynamic", "--rope-factor", 2], "--rope-scaling"),
    "rope-factor": (["--rope-scaling", "linear", "--rope-factor", 2],
                    ["--rope-scaling", "linear", "--rope-factor", 4], "--rope-factor"),
    "rope-theta": (["--rope-theta", 20000], [], "--rope-theta"),
    "rope-orig-ctx": (["--rope-scaling", "linear", "--rope-factor", 2, "--rope-orig-ctx", 64],
                      ["--rope-scaling", "linear", "--rope-factor", 2], "--rope-orig-ctx"),
    "context": (["-c", 64], ["-c", 32], "-c 32"),
    "bigger context": (["-c", 32], ["-c", 64], "-c 64"),
    "chunk": (["--chunk", 4], ["--chunk", 8], "--chunk 8"),
    "memory": (MEMORY, MEMORY[:4], "holds a context memory: add --memory --memory-block 4 "
               "--memory-blocks 2"),
    "no memory": (MEMORY[:4], MEMORY, "holds no context memory (it was saved without --memory): "
                  "leave --memory out"),
    "memory-block": (MEMORY, [*MEMORY, "--memory-block", 8],
                     "holds a context memory of 4-position blocks, this run's are 8: add "
                     "--memory-block 4"),
    "memory-blocks": (MEMORY, [*MEMORY, "--memory-blocks", 3], "--memory-blocks 2; this run has 3"),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_each_differing_setting_is_refused_by_name(models, tmp_path, name):
    saved, loading, named = SETTINGS[name]
    path = tmp_path / "s.state"
    save(models["a"], path, *saved)
    assert clean(load(models["a"], path, *saved)).returncode == 0   # the same options load
    refused(load(models["a"], path, *loading), named)


def test_memory_budget_may_differ(models, memory_state):
    """--memory-budget only says where the memory's rows live: a budget of one block of every
    layer puts the loading run's rows in files, and the state loads."""
    r = clean(load(models["a"], memory_state[0], *MEMORY, "--kv-type", "f16", "--memory-budget",
                   0.001))
    assert r.returncode == 0 and "copied into files" in r.stderr, r.stderr[-2000:]


def test_chat_refuses_a_plain_text_state(models, state):
    r = asan(models["a"], "-m", "chat", "--load-state", state[0], "-n", 2, input="hi\n")
    refused(r, "plain text", "-m chat -f DOC --save-state")


# ----------------------------------------------------------------------------
# Damaged contents: refused where the loader can tell, harmless where it cannot

def test_a_header_field_out_of_line_is_refused(models, state, tmp_path):
    """Each count the cache's shape fixes, set to another value: refused as damaged, or as the
    option it records, never built on. A huge context once made the loading run allocate a
    cache that size before comparing it with the file's (ASan aborts on such a calloc); an
    unknown KV type was named as an option to add ("--kv-type ?")."""
    blob = state[1]
    h = header(blob)
    damaged = "the file is damaged"
    changes = [("file_size", h["file_size"] + 4096), ("n_layers", 3), ("vocab_size", 321),
               ("kv_type", 7), ("lminf", 2), ("context", 32), ("context", 0), ("context", 2**40),
               ("context", 2**64 - 1), ("max_T", 0), ("max_T", 1 << 20), ("sink_kind", 1),
               ("n_slots", h["n_slots"] * 2), ("n_slots", 2**40), ("max_sink", h["max_sink"] + 1),
               ("kv_dim", 16), ("row_bytes", 64), ("n_tokens", 0), ("n_tokens", 65),
               ("n_tokens", 2**63), ("n_tokens", 3), ("kind", 2), ("n_kv_heads", 3),
               ("n_kv_heads", 2**32 - 1), ("head_dim", 1)]
    options = [("lminf", 1, "--lminf"), ("n_sink", 4, "--sinks 4"), ("window", 8, "--window 8"),
               ("limit", 9, "--lminf-limit 9")]
    for name, value, words in [(n, v, damaged) for n, v in changes] + options:
        r = load_bytes(models, tmp_path, patch(blob, *field(name), value))
        assert r.returncode == 1, (name, value, r.stderr[-2000:])
        assert words in refused(r), (name, value)
    off = SECTIONS_AT + 16 * SECTIONS.index("keys")
    refused(load_bytes(models, tmp_path, patch(blob, off, "<Q", sections(blob)["keys"][0] + 8)),
            "sections are not where", damaged)
    # a memory's fields on a state without one: refused before any is named as an option
    for name, value in [("memory", 1), ("memory", 2), ("memory_block", 4), ("memory_blocks", 2),
                        ("memory_distance", 32), ("memory_positions", h["n_tokens"])]:
        r = load_bytes(models, tmp_path, patch(blob, *field(name), value))
        assert damaged in refused(r), (name, value)


def test_a_memory_header_field_out_of_line_is_refused(models, memory_state, tmp_path):
    """A state with a memory: its block size 0 (a division by zero in the layout), a flag
    past 1, a count of memory positions that is not the text's, or a memory section moved."""
    blob = memory_state[1]
    h = header(blob)
    options = [*MEMORY, "--kv-type", "f16"]
    changes = [("memory", 2), ("memory_block", 0), ("memory_block", 1 << 20),
               ("memory_blocks", 1 << 20), ("memory_distance", 0),
               ("memory_distance", 1 << 31),
               ("memory_positions", h["n_tokens"] - 1), ("memory_positions", h["n_tokens"] + 1),
               ("memory_positions", 0), ("memory_positions", 2**63), ("n_kv_heads", 2**32 - 1)]
    for name, value in changes:
        r = load_bytes(models, tmp_path, patch(blob, *field(name), value), *options)
        assert "the file is damaged" in refused(r), (name, value)
    for name in ["mem_keys", "mem_bound_scales"]:
        off = SECTIONS_AT + 16 * SECTIONS.index(name)
        for at, value in [(off, sections(blob)[name][0] + 4096), (off + 8, 0)]:
            r = load_bytes(models, tmp_path, patch(blob, at, "<Q", value), *options)
            refused(r, "sections are not where", "the file is damaged")


def test_a_windowed_states_token_count_is_bounded_by_its_file(models, tmp_path):
    """A window's cache takes a text of any length, so only the file bounds n_tokens: a huge
    one was refused by an overflow check as "state: size overflows", naming neither."""
    path = tmp_path / "w.state"
    blob = save(models["a"], path, "--window", 8, "--sinks", 2)
    for n in [2**62, 2**64 - 1, 10**6]:
        r = load_bytes(models, tmp_path, patch(blob, *field("n_tokens"), n), "--window", 8,
                       "--sinks", 2)
        refused(r, f"{n} tokens in a file of", "the file is damaged")


def u64_at(blob, section, index=0):
    return sections(blob)[section][0] + 8 * index


def test_damaged_records_are_refused(models, state, tmp_path):
    """A slot record, a RoPE table length, a token id or a layer config changed inside its
    section: each is checked against what the settings and the text allow."""
    blob = state[1]
    tokens = sections(blob)["tokens"][0]
    layers = sections(blob)["layer_config"][0]
    slots = "slots do not follow from its settings: the file is damaged"
    rope = "RoPE table length"
    vocab = "outside the vocabulary: the file is damaged"
    cases = [(u64_at(blob, "slots", 2), "<Q", 63, slots),        # layer 0's ring
             (u64_at(blob, "slots", 5), "<Q", 7, slots),         # layer 1's first slot
             (u64_at(blob, "slots", 4), "<Q", 2, slots),         # layer 0's fills
             (u64_at(blob, "slots", 3), "<Q", 5, slots),         # layer 0's window
             (u64_at(blob, "rope_len"), "<Q", 12345, rope),
             (u64_at(blob, "rope_len", 1), "<Q", 0, rope),
             (tokens + 4 * 3, "<i", 320, vocab),
             (tokens, "<i", -1, vocab),
             (layers, "<I", 0xFFFFFFFF, "layer 0 differs")]   # its RoPE type: another option
    for at, fmt, value, words in cases:
        refused(load_bytes(models, tmp_path, patch(blob, at, fmt, value)), words)


@pytest.mark.parametrize("section", ["keys", "values", "sink_keys", "logits", "mem_keys",
                                     "mem_values", "mem_bounds", "mem_bound_scales"])
def test_damaged_rows_and_logits_cannot_crash(models, state, memory_state, tmp_path, section):
    """Rows, sinks, the memory's rows and block bounds, and logits are data the loader cannot
    check. Finite garbage (every float 12.08) changes the reply and nothing else; NaNs reach the
    logits, which sample() refuses (one error line). Generation from the state and a
    continuation of it run clean."""
    blob = memory_state[1] if section.startswith("mem") else state[1]
    options = [*MEMORY, "--kv-type", "f16"] if section.startswith("mem") else []
    off, size = sections(blob)[section]   # all of it: slots the text never reached too
    for fill, runs in [(b"\x41", True), (b"\xff\x7f\x80\x7f", False)]:   # 12.08; a NaN
        bad = blob[:off] + fill * (size // len(fill)) + blob[off + size:]
        for extra in [[], ["-i", " and more"]]:
            r = clean(load_bytes(models, tmp_path, bad, *options, *extra))
            if runs or r.returncode == 0:
                assert r.returncode == 0, r.stderr[-2000:]
            else:
                refused(r, "the logit nan")


# ----------------------------------------------------------------------------
# A failed save leaves the previous state as it was

def limit_file_size(max_bytes, ignore_sigxfsz):
    """For preexec_fn: a file may grow to max_bytes. Past it the kernel sends SIGXFSZ, whose
    default action kills the process; ignored (inherited across exec), the write fails with
    EFBIG instead, as on a full disk."""
    def apply():
        if ignore_sigxfsz:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def temporaries(path):
    return sorted(n for n in os.listdir(path.parent) if n.startswith(path.name + ".tmp."))


@pytest.mark.parametrize("ignore_sigxfsz", [False, True])
def test_a_save_cut_short_leaves_the_previous_state(models, state, tmp_path, ignore_sigxfsz):
    """A save that dies past 8 KiB (in the slot records): killed by SIGXFSZ, or told EFBIG and
    refusing with one error line. The previous state file is byte for byte as it was and still
    loads. die() removes its temporary; a killed process cannot, so NAME.tmp.XXXXXX may stay
    then (never NAME itself: the rename comes after the last write)."""
    path = tmp_path / "s.state"
    path.write_bytes(state[1])
    r = asan(models["a"], "-i", TEXT + " More text.", "-n", 1, "-c", 64, "--chunk", 4,
             "--save-state", path, preexec_fn=limit_file_size(8192, ignore_sigxfsz))
    if ignore_sigxfsz:
        refused(r, str(path), "write failed", os.strerror(27))   # EFBIG: File too large
        assert temporaries(path) == []
    else:
        assert r.returncode == -signal.SIGXFSZ, r.stderr[-2000:]
        assert len(temporaries(path)) == 1   # what the killed run was writing
    assert path.read_bytes() == state[1]
    r = clean(load(models["a"], path))
    n_tokens = header(state[1])["n_tokens"]
    assert r.returncode == 0 and f"{n_tokens} tokens" in r.stderr, r.stderr[-2000:]


def test_a_state_path_that_cannot_be_written_is_refused(models, tmp_path):
    refused(asan(models["a"], "-i", TEXT, "-n", 1, "--save-state", tmp_path), "is a directory")
    refused(asan(models["a"], "-i", TEXT, "-n", 1, "--save-state", tmp_path / "no" / "s.state"),
            "cannot create a file beside it", "No such file or directory")
    refused(asan(models["a"], "-i", TEXT, "-n", 1, "--save-state", "/dev/null"),
            "must be a regular file")
    before = open(models["a"], "rb").read()
    refused(asan(models["a"], "-i", TEXT, "-n", 1, "--save-state", models["a"]),
            "would overwrite the input")
    assert open(models["a"], "rb").read() == before
    assert os.listdir(tmp_path) == []
