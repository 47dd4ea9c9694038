"""State files (--save-state / --load-state / --reset-turns) are exact: a run that loads a state
goes on as if the saving run had never stopped.

1. logits: on tiny random models, for every attention kind (full; StreamingLLM --sinks +
   --window; LM-Infinite; a model's own sliding window on some layers, Qwen2) with every KV
   cache type, and every RoPE method (linear, dynamic NTK with its table grown past
   --rope-orig-ctx before the save, YaRN, Llama 3, LongRoPE on both sides of its switch) with a
   full and a windowed cache, the rows a loading run writes equal, bit for bit, the same rows of
   one run over all ids (the first part a multiple of --chunk, so both runs make the same
   forward calls).
2. generate: with one seed and temperature > 0 (and a repeat penalty, which reads the saved
   text), the loading run samples the saving run's ids (a context memory too); a continuation prompt after the state
   samples what one run over both prompts does; a small -c that generation overflows after the
   load switches to StreamingLLM as the uninterrupted run does.
   With a context memory (--memory: blocks moved to the default distance and at their true
   distances, every KV type, its rows in files
   past --memory-budget on the loading side, a chain, token by token) the same holds: the state
   holds the memory's rows and block bounds.
3. ppl: the NLL sums add up, ppl(A) + ppl(B after A's state) = ppl(A + B).
4. chat on SmolLM2-135M-Instruct: the state holds HF's ids for the template's opening up to
   the document; a loading run answers as the saving run; --reset-turns answers each question
   as a fresh run from the state; the first reply is HF generate() on the opening's ids and the
   question's; logits after a load are exact on a windowed q8 cache and on YaRN x4; with a
   context memory a loading run and --reset-turns answer as the saving run and fresh runs.
"""
import re
import struct

import numpy as np
import pytest
import torch
from conftest import RUN_ASAN, export, need, run
from test_chat import DOC, SYSTEM, smol  # noqa: F401 (smol: the SmolLM2 fixture)
from test_engine import TINY, build_hf

SEQ, CHUNK, SPLIT = 80, 8, 40   # ids per case; the first part: 5 chunks, past every window
ONE = ["--threads", 1]          # tiny models: a second thread only waits
KV_TYPES = ["f32", "f16", "q8"]
ATTENTION = {
    "full": [],
    "sinks": ["--sinks", 4, "--window", 16],
    "lminf": ["--lminf", "--sinks", 4, "--window", 16, "--lminf-limit", 12],
}
ROPE = {   # the methods set on the command line (L0 16 or 32 < SPLIT: scaled before the save)
    "linear": ["--rope-scaling", "linear", "--rope-factor", 4],
    "dynamic": ["--rope-scaling", "dynamic", "--rope-factor", 2, "--rope-orig-ctx", 16],
    "yarn": ["--rope-scaling", "yarn", "--rope-factor", 4, "--rope-orig-ctx", 32],
    "llama3": ["--rope-scaling", "llama3", "--rope-factor", 8, "--rope-orig-ctx", 32],
}
LONGROPE_L0 = 32


def families():
    """llama: the attention kinds and command-line RoPE methods; qwen2_w16_mixed: layer 0 full,
    layer 1 a 16-key sliding window (test_windows.py's); longrope: LongRoPE from the config, as
    test_rope.py's longrope_llama (short list up to L0 = 32, the long one past it)."""
    from transformers import LlamaConfig, Qwen2Config
    rng = np.random.default_rng(4)
    half = TINY["hidden_size"] // TINY["num_attention_heads"] // 2
    lists = {"short_factor": [float(x) for x in rng.uniform(1.0, 1.6, half)],
             "long_factor": [float(x) for x in rng.uniform(1.0, 6.0, half)]}
    longrope = {"rope_type": "longrope", "original_max_position_embeddings": LONGROPE_L0, **lists}
    return {
        "llama": LlamaConfig(**TINY, rope_theta=10000.0),
        "qwen2_w16_mixed": Qwen2Config(**TINY, use_sliding_window=True, sliding_window=16,
                                       max_window_layers=1),
        "longrope": LlamaConfig(**{**TINY, "max_position_embeddings": 128},
                                rope_parameters=longrope),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: f32 model file}, and the ids every case reads."""
    out = {}
    for name, cfg in families().items():
        d = tmp_path_factory.mktemp(name)
        build_hf(name, cfg, d / "hf")
        out[name] = export(d / "hf", d / "f32.bin")
    ids = [int(i) for i in np.random.default_rng(21).integers(0, TINY["vocab_size"], SEQ)]
    return out, ids, tmp_path_factory.mktemp("state")


def logits(model, ids, path, *args, binary=None, stderr=None):
    """-m logits rows (n, vocab) of ids, written to path (stderr: a list the run's is added to)."""
    r = run(model, "-m", "logits", "-i", " ".join(map(str, ids)), "--logits-out", path, *ONE,
            *args, binary=binary)
    if stderr is not None:
        stderr.append(r.stderr)
    return np.fromfile(path, dtype="<f4").reshape(len(ids), -1)


def state_header(path):
    """(n_tokens, kind) and the tokens of a state file (model.h StateHeader: n_tokens at byte
    112, kind at 120, sections[] of (offset, size) at 160, the tokens the fourth)."""
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:4] == b"LRST"
    n_tokens, kind = struct.unpack_from("<QI", blob, 112)
    offset, size = struct.unpack_from("<QQ", blob, 160 + 16 * 3)
    tokens = list(struct.unpack_from(f"<{size // 4}i", blob, offset))
    return n_tokens, kind, tokens


def split_equals_whole(model, ids, d, name, options, split=SPLIT, chunk=CHUNK, binary=None,
                       seen=None, load_options=(), load_says=None):
    """Save after ids[:split], load and go on over the rest; both parts' rows against one run
    of the same binary over all ids. Returns the failures (empty: bit-identical). seen: the
    whole runs' rows by case, for the caller to check that every case computes its own.
    load_options: given to the loading run only; load_says: what its stderr must hold."""
    common = ["--chunk", chunk, *options]
    whole = logits(model, ids, d / f"{name}.whole", *common, binary=binary)
    if seen is not None:
        seen[name] = whole.tobytes()
    state = d / f"{name}.state"
    first = logits(model, ids[:split], d / f"{name}.first", *common, "--save-state", state,
                   binary=binary)
    assert state_header(state)[:2] == (split, 0)
    said = []
    rest = logits(model, ids[split:], d / f"{name}.rest", *common, *load_options,
                  "--load-state", state, binary=binary, stderr=said)
    assert load_says is None or load_says in said[0], said[0]
    failures = []
    for part, got, want in (("first", first, whole[:split]), ("rest", rest, whole[split:])):
        if not np.array_equal(got, want):
            rows = np.nonzero((got != want).any(-1))[0]
            failures.append(f"{name} {part}: rows {rows.tolist()[:5]}.. differ, max "
                            f"{np.abs(got - want).max():.3g}")
    return failures


def chain_equals_whole(model, ids, d, name, options, cuts=(16, 48)):
    """ids[:16] saved; loaded, ids[16:48] run and saved again over the same state file; loaded,
    the rest: each part's rows against one run over all ids."""
    common = ["--chunk", CHUNK, *options]
    whole = logits(model, ids, d / f"{name}.whole", *common)
    state = d / f"{name}.state"
    parts = [logits(model, ids[:cuts[0]], d / f"{name}.0", *common, "--save-state", state)]
    parts.append(logits(model, ids[cuts[0]:cuts[1]], d / f"{name}.1", *common, "--load-state",
                        state, "--save-state", state))
    assert state_header(state)[0] == cuts[1]
    parts.append(logits(model, ids[cuts[1]:], d / f"{name}.2", *common, "--load-state", state))
    got = np.concatenate(parts)
    if np.array_equal(got, whole):
        return []
    return [f"{name}: rows {np.nonzero((got != whole).any(-1))[0].tolist()[:5]}.. differ"]


def logits_cases():
    """(family, name, options): every attention kind with every KV type (default RoPE), every
    RoPE method with a full and a windowed cache (KV types taking turns)."""
    cases = []
    for kv in KV_TYPES:
        for kind, opts in ATTENTION.items():
            cases.append(("llama", f"{kind}-{kv}", [*opts, "--kv-type", kv]))
        cases.append(("qwen2_w16_mixed", f"native-{kv}", ["--kv-type", kv]))
    windowed = ["sinks", "lminf"]
    for i, (method, opts) in enumerate(ROPE.items()):
        for j, kind in enumerate(["full", windowed[i % 2]]):
            kv = KV_TYPES[(i + j) % 3]
            cases.append(("llama", f"{method}-{kind}-{kv}", [*opts, *ATTENTION[kind], "--kv-type",
                                                            kv]))
    for kind, kv in (("full", "f16"), ("sinks", "q8")):
        cases.append(("longrope", f"longrope-{kind}-{kv}", [*ATTENTION[kind], "--kv-type", kv]))
    return cases


def test_logits_after_load_are_exact(models):
    paths, ids, d = models
    failures = []
    cases = logits_cases()
    seen = {}
    for family, name, options in cases:
        failures += split_equals_whole(paths[family], ids, d, name, options, seen=seen)
    # each case is its own computation: no option was lost on the way
    assert len(set(seen.values())) == len(cases), "two cases gave the same logits"
    # LongRoPE saved before its switch (24 < L0 = 32): the loading run crosses it
    failures += split_equals_whole(paths["longrope"], ids, d, "longrope-before-switch",
                                   ATTENTION["lminf"], split=24)
    # a chain: the second part saved from the loaded state (over the same file), the third
    # loaded from that
    for name, opts in (("chain-dynamic-full-q8", [*ROPE["dynamic"], "--kv-type", "q8"]),
                       ("chain-sinks-f16", [*ATTENTION["sinks"], "--kv-type", "f16"])):
        failures += chain_equals_whole(paths["llama"], ids, d, name, opts)
    # token by token (the decode path) and through the sanitizer build
    failures += split_equals_whole(paths["llama"], ids[:48], d, "sinks-q8-asan",
                                   [*ATTENTION["sinks"], "--kv-type", "q8"], split=30,
                                   chunk=1, binary=need(RUN_ASAN, "make run-asan"))
    print(f"\n[state] logits: {len(cases) + 4} cases, {len(failures)} differ; the others' rows "
          f"after --load-state equal one run's bit for bit")
    assert not failures, "; ".join(failures)


# The context memory (--memory) on a 4 + 16 window: blocks of 8, 2 retrieved per chunk and kv
# head, so that the first part (40 ids) leaves blocks behind the window to choose from
MEMORY = [*ATTENTION["sinks"], "--memory", "--memory-block", 8, "--memory-blocks", 2]


def test_logits_after_load_with_memory_are_exact(models):
    """A state holds the context memory: its rows and block bounds go into the loading run's
    memory, which then retrieves as the uninterrupted run's did. Blocks moved to the default
    --memory-distance and at true distances (--memory-distance 1000), every KV type; the
    loading run's memory past a --memory-budget of 5 KB (its rows in files, the saving run's
    in RAM); Qwen2's own window on layer 1; a chain; token by token
    through the sanitizer build."""
    paths, ids, d = models
    failures = []
    cases = [("llama", "memory-far-f32", [*MEMORY, "--kv-type", "f32"]),
             ("llama", "memory-true-q8", [*MEMORY, "--memory-distance", 1000, "--kv-type", "q8"]),
             ("llama", "memory-far-f16", [*MEMORY, "--kv-type", "f16"]),
             ("qwen2_w16_mixed", "memory-true-f32", [*MEMORY, "--memory-distance", 1000])]
    seen = {}
    for family, name, options in cases:
        failures += split_equals_whole(paths[family], ids, d, name, options, seen=seen)
    # without the memory's blocks the same window gives other logits: the memory is used
    seen["no-memory"] = logits(paths["llama"], ids, d / "no-memory", "--chunk", CHUNK,
                               *ATTENTION["sinks"]).tobytes()
    assert len(set(seen.values())) == len(seen), "a case gave another case's logits"
    failures += split_equals_whole(paths["llama"], ids, d, "memory-true-q8-files",
                                   [*MEMORY, "--memory-distance", 1000, "--kv-type", "q8"],
                                   load_options=["--memory-budget", 0.005],
                                   load_says="40 positions (0.0 MB copied into files)")
    failures += chain_equals_whole(paths["llama"], ids, d, "memory-chain-f16",
                                   [*MEMORY, "--kv-type", "f16"])
    failures += split_equals_whole(paths["llama"], ids[:48], d, "memory-far-q8-asan",
                                   [*MEMORY, "--kv-type", "q8"], split=32, chunk=1,
                                   binary=need(RUN_ASAN, "make run-asan"))
    print(f"\n[state] memory logits: {len(cases) + 3} cases, {len(failures)} differ; the others' "
          f"rows after --load-state equal one run's bit for bit")
    assert not failures, "; ".join(failures)


def generated(model, *args, binary=None):
    """The ids a generate run samples (--ids: the prompt is ids, the output ids) and stderr."""
    r = run(model, "-m", "generate", "--ids", *ONE, *args, binary=binary)
    return [int(x) for x in r.stdout.split()], r.stderr


# Sampling at temperature 0.9 with a repeat penalty (which reads the saved text's ids too)
SAMPLING = ["-t", 0.9, "-s", 5, "--repeat-penalty", 1.3]


def test_generate_after_load_samples_the_same(models):
    paths, ids, d = models
    model = paths["llama"]
    cases = 0
    for name, opts in (("full-f32", []), ("lminf-q8", [*ATTENTION["lminf"], "--kv-type", "q8"]),
                       ("dynamic-sinks-f16", [*ROPE["dynamic"], *ATTENTION["sinks"], "--kv-type",
                                              "f16"]),
                       ("memory-true-f16", [*MEMORY, "--memory-distance", 1000, "--kv-type", "f16"])):
        common = ["--chunk", CHUNK, "-n", 30, *SAMPLING, *opts]
        state = d / f"gen-{name}.state"
        # no prompt after the load: sampling starts from the saved logits
        saving, _ = generated(model, "-i", " ".join(map(str, ids[:24])), *common, "--save-state",
                              state)
        loading, _ = generated(model, *common, "--load-state", state)
        assert len(saving) == 30 and loading == saving, (name, saving, loading)
        # a continuation prompt: as one prompt of both parts
        more = " ".join(map(str, ids[24:40]))
        loading, _ = generated(model, "-i", more, *common, "--load-state", state)
        whole, _ = generated(model, "-i", " ".join(map(str, ids[:40])), *common)
        assert loading == whole and whole != saving, (name, whole, loading)
        cases += 2
    print(f"\n[state] generate: {cases} cases, the loading run samples the uninterrupted run's ids")


def test_generate_overflows_after_load(models):
    """A full cache of -c slots holding a 24-token prompt: generating 60 tokens after the load
    fills it and goes on as StreamingLLM, as the saving run and a run without any state do;
    with -c 24 the state itself fills the context, and the switch comes at the first token."""
    paths, ids, d = models
    state = d / "overflow.state"
    cases = [("llama", 48, kv) for kv in KV_TYPES]
    cases += [("llama", 24, "f16"), ("qwen2_w16_mixed", 24, "q8"), ("qwen2_w16_mixed", 40, "f32")]
    for family, context, kv in cases:
        model = paths[family]
        common = ["-c", context, "--chunk", CHUNK, "-n", 60, *SAMPLING, "--kv-type", kv]
        prompt = ["-i", " ".join(map(str, ids[:24]))]
        plain, _ = generated(model, *prompt, *common)
        saving, _ = generated(model, *prompt, *common, "--save-state", state)
        loading, stderr = generated(model, *common, "--load-state", state)
        assert "context full: going on with 4 sinks" in stderr, stderr
        assert len(plain) == 60 and saving == plain and loading == plain, \
            (family, context, kv, plain, loading)
    print(f"\n[state] generate past a full context after the load: {len(cases)} cases, the "
          f"uninterrupted run's ids")


def mean_nll(stdout):
    """(predicted tokens, mean NLL) from the ppl line."""
    m = re.search(r"over (\d+) predicted tokens \(mean NLL ([\d.]+)", stdout)
    assert m, stdout
    return int(m.group(1)), float(m.group(2))


def test_ppl_sums_add_up(models):
    """ppl(A) over nA - 1 predictions + ppl(B from A's state) over nB = ppl(A + B) over
    nA + nB - 1: the state's logits predict B's first token."""
    paths, ids, d = models
    model = paths["llama"]
    cases = (("full-f32", []), ("lminf-q8", [*ATTENTION["lminf"], "--kv-type", "q8"]),
             ("yarn-sinks-f16", [*ROPE["yarn"], *ATTENTION["sinks"], "--kv-type", "f16"]),
             ("memory-far-q8", [*MEMORY, "--kv-type", "q8"]))
    for name, opts in cases:
        state = d / f"ppl-{name}.state"
        common = ["-m", "ppl", "--ids", "--chunk", CHUNK, *ONE, *opts]
        text = lambda part: " ".join(map(str, part))
        n_a, a = mean_nll(run(model, *common, "-i", text(ids[:SPLIT]), "--save-state",
                              state).stdout)
        n_b, b = mean_nll(run(model, *common, "-i", text(ids[SPLIT:]), "--load-state",
                              state).stdout)
        n, whole = mean_nll(run(model, *common, "-i", text(ids)).stdout)
        assert (n_a, n_b, n) == (SPLIT - 1, SEQ - SPLIT, SEQ - 1)
        # each mean is printed to 6 decimals: the sums may differ by half a unit of the last
        # digit per prediction counted (4e-5 here, 2e-7 of the sum)
        total = n_a * a + n_b * b
        assert abs(total - n * whole) <= 0.5e-6 * (n_a + n_b + n), (name, total, n * whole)
    print(f"\n[state] ppl: {len(cases)} cases, NLL sums of the parts equal the whole's")


# ---------------------------------------------------------------------------------------------
# Chat on SmolLM2-135M-Instruct (test_chat.py's f32 export and HF model)

QUESTIONS = ["Where does the river end? Answer in one sentence.", "How long is it?"]
STEPS = 32


def chat(model, stdin, *args):
    """Greedy replies as ids, one list per question."""
    r = run(model, "-m", "chat", "-t", 0, "--ids", "-n", STEPS, *ONE, *args, input=stdin)
    return r.stdout, [[int(x) for x in line.split()] for line in r.stdout.split("\n")[:-1]]


def test_chat_from_a_state(smol, tmp_path):  # noqa: F811 (the fixture)
    model, tok, hf = smol
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    state = tmp_path / "doc.state"
    both = "".join(q + "\n" for q in QUESTIONS)
    # -c: the context the state is made for (default: the trained 8192)
    saved, replies = chat(model, both, "-f", doc, "--system", SYSTEM, "-c", 512, "--save-state",
                          state)
    assert len(replies) == 2, saved
    loaded, _ = chat(model, both, "--load-state", state)
    assert loaded == saved, "the loading run answers otherwise than the saving run"
    _, reset = chat(model, both, "--load-state", state, "--reset-turns")
    _, alone = chat(model, QUESTIONS[1] + "\n", "--load-state", state)
    assert reset == [replies[0], alone[0]], (reset, replies, alone)

    # HF: the template's text, its opening (up to the document and its blank line) and the
    # rest (the question and the assistant cue) encoded apart, as run.c encodes them
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": DOC + "\n\n" + QUESTIONS[0]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    cut = text.index(DOC) + len(DOC) + 2
    opening = tok.encode(text[:cut], add_special_tokens=False)
    ids = opening + tok.encode(text[cut:], add_special_tokens=False)
    n_tokens, kind, tokens = state_header(state)
    assert (n_tokens, kind) == (len(opening), 1) and tokens == opening, (tokens, opening)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a 135M model, one sequence: 3.5 s on one thread, 60 s on two
    try:                       # of a busy 2-core machine
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=STEPS,
                              eos_token_id=eos, pad_token_id=eos)
    finally:
        torch.set_num_threads(threads)
    want = out[0, len(ids):].tolist()
    want = want[:-1] if want[-1] == eos else want
    assert replies[0] == want, (tok.decode(replies[0]), tok.decode(want))
    print(f"\n[state] chat: a loading run answers {len(replies)} questions as the saving run; "
          f"--reset-turns as fresh runs; reply 1 ({len(want)} tokens) is HF's: "
          f"{tok.decode(want)!r}")


def test_chat_from_a_state_with_memory(smol, tmp_path):  # noqa: F811 (the fixture)
    """A document's state with its context memory (a 4 + 16 window, blocks of 8, 2 retrieved:
    the 70-token opening leaves blocks behind the window): a loading run answers as the saving
    run, and --reset-turns (the memory copied in afresh before each question, over what the
    first turn wrote) answers question 2 as a fresh run from the state."""
    model = smol[0]
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    state = tmp_path / "memory.state"
    memory = ["--window", 16, "--sinks", 4, "--memory", "--memory-block", 8, "--memory-blocks", 2,
              "--kv-type", "f16"]
    both = "".join(q + "\n" for q in QUESTIONS)
    saved, replies = chat(model, both, "-f", doc, "--system", SYSTEM, "--chunk", 16, *memory,
                          "--save-state", state)
    assert len(replies) == 2 and state_header(state)[0] > 40, saved
    loaded, _ = chat(model, both, *memory, "--load-state", state)
    assert loaded == saved, "the loading run answers otherwise than the saving run"
    _, reset = chat(model, both, *memory, "--load-state", state, "--reset-turns")
    _, alone = chat(model, QUESTIONS[1] + "\n", *memory, "--load-state", state)
    assert reset == [replies[0], alone[0]], (reset, replies, alone)
    print(f"\n[state] chat with a context memory: the loading run answers as the saving run; "
          f"--reset-turns as fresh runs")


def test_reset_turns_after_a_full_context(smol, tmp_path):  # noqa: F811 (the fixture)
    """--reset-turns undoes what turn 1 did to the cache: with -c 100 turn 1's reply fills the
    context (the switch to StreamingLLM re-lays the slots), and dynamic NTK with L0 = 64 grows
    its table past where turn 2 starts; reply 2 must be a fresh run's from the state."""
    model = smol[0]
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    state = tmp_path / "dynamic.state"
    rope = ["--rope-scaling", "dynamic", "--rope-factor", 2, "--rope-orig-ctx", 64]
    both = "".join(q + "\n" for q in QUESTIONS)
    _, replies = chat(model, both, "-f", doc, "--system", SYSTEM, "-c", 100, *rope,
                      "--save-state", state)
    r = run(model, "-m", "chat", "-t", 0, "--ids", "-n", STEPS, *ONE, *rope, "--load-state",
            state, "--reset-turns", input=both)
    assert r.stderr.count("context full: going on with 4 sinks") == 1, r.stderr
    reset = [[int(x) for x in line.split()] for line in r.stdout.split("\n")[:-1]]
    _, alone = chat(model, QUESTIONS[1] + "\n", *rope, "--load-state", state)
    assert reset == [replies[0], alone[0]], (reset, replies, alone)
    print(f"\n[state] --reset-turns after a full context and a grown dynamic NTK table: reply 2 "
          f"({len(alone[0])} tokens) is a fresh run's")


def test_smollm2_logits_after_load_are_exact(smol, tmp_path):  # noqa: F811 (the fixture)
    """A 4 + 8 window (ring 4 + 15 slots: wrapped before the save at 24) on a q8 cache, and
    YaRN x 4, on the real model: 32 ids, loaded after 24."""
    model = smol[0]
    ids = [i * 97 % 49152 for i in range(1, 33)]
    failures = []
    cases = {"sinks-q8": ["--sinks", 4, "--window", 8, "--kv-type", "q8"],
             "yarn4": ["--rope-scaling", "yarn", "--rope-factor", 4]}
    for name, opts in cases.items():
        failures += split_equals_whole(model, ids, tmp_path, name, opts, split=24)
    print(f"\n[state] SmolLM2 logits: {len(cases)} cases, {len(failures)} differ")
    assert not failures, "; ".join(failures)
