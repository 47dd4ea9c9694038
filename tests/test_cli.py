"""The command line of ./run: --help lists exactly the options the parser knows, every option is
accepted (and does what it says, where that is cheap to see), bad command lines exit 2 with one
`error:` line (-n 0 among them), seeds reproduce, -f - and -f DIR. On SmolLM2-135M-Instruct exported at q8_0."""
import os
import re
import subprocess

import numpy as np
import pytest
from conftest import ROOT, RUN, export, need, run, tiny_llama

PROMPT = "Once upon a time"
COUNT = "1, 2, 3, 4, 5, 6, 7, 8,"


@pytest.fixture(scope="module")
def model(smollm2_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return export(smollm2_gguf, d / "q8.bin", "q8_0")


def raw(*args, input=None):
    """./run ARGS (model included, or not), unchecked."""
    return subprocess.run([need(RUN, "build it with make"), *map(str, args)], capture_output=True, text=True,
                          input=input)


def ids_of(r):
    return [int(x) for x in r.stdout.split()]


def usage_flags(text):
    flags = set()
    for line in text.splitlines():
        m = re.match(r"\s+(-[-\w]+)(?:,\s+(-[-\w]+))?", line)
        if m:
            flags.update(f for f in m.groups() if f)
    return flags


def parser_flags():
    src = open(os.path.join(ROOT, "run.c")).read()
    # the parser: parse_switch(), the parse_*_option() tables and parse_options() itself
    body = src[src.index("static int parse_switch("):]
    body = body[:body.index("\n}\n", body.index("static Options parse_options("))]
    return set(re.findall(r'strcmp\((?:flag|argv\[1\]), "(-[^"]+)"\)', body))


def test_help_lists_every_option_the_parser_accepts(model):
    r = raw("--help")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("usage: run MODEL")
    listed, parsed = usage_flags(r.stdout), parser_flags()
    print(f"\n[cli] --help lists {len(listed)} options: {' '.join(sorted(listed))}")
    assert len(parsed) >= 19
    assert listed == parsed, f"only in --help: {listed - parsed}; only in parse_options: {parsed - listed}"
    for args in [("-h",), (model, "--help"), (model, "-i", "x", "-h"), (model, "-n", "5", "--help")]:
        r2 = raw(*args)
        assert r2.returncode == 0 and r2.stdout == r.stdout, args
    for args in [(), ("-i", "x"), ("--ids",)]:   # no model: the usage and an error, on stderr, exit 2
        r2 = raw(*args)
        assert r2.returncode == 2 and r2.stdout == "" and r2.stderr.startswith(r.stdout), args
        assert r2.stderr[len(r.stdout):].startswith("error: "), args


# Every flag of --help with a valid value: (flag, extra args making a complete, tiny run)
ACCEPTED = {
    "-m": ["-m", "generate", "-i", PROMPT, "-n", "2"],
    "-i": ["-i", PROMPT, "-n", "2"],
    "-f": ["-f", "{prompt_file}", "-n", "2"],
    "--ids": ["--ids", "-i", "1 2 3", "-n", "2"],
    "--bos": ["-m", "tokenize", "--bos", "-i", PROMPT],
    "-n": ["-n", "3", "-i", PROMPT],
    "-t": ["-t", "0.5", "-i", PROMPT, "-n", "2"],
    "-k": ["-k", "5", "-i", PROMPT, "-n", "2"],
    "-p": ["-p", "0.5", "-i", PROMPT, "-n", "2"],
    "--min-p": ["--min-p", "0.2", "-i", PROMPT, "-n", "2"],
    "--repeat-penalty": ["--repeat-penalty", "1.3", "-i", PROMPT, "-n", "2"],
    "--repeat-last-n": ["--repeat-last-n", "8", "-i", PROMPT, "-n", "2"],
    "-s": ["-s", "42", "-i", PROMPT, "-n", "2"],
    "--system": ["-m", "chat", "--system", "Be brief.", "-n", "2"],
    "--no-echo": ["--no-echo", "-i", PROMPT, "-n", "2"],
    "--stop": ["--stop", ".", "-i", PROMPT, "-n", "2"],
    "--show-prompt": ["--show-prompt", "-i", PROMPT, "-n", "2"],
    "--save-state": ["-m", "chat", "-i", "A short note.", "--save-state", "{state_file}", "-n", "2"],
    "--load-state": ["-m", "chat", "--load-state", "{state_file}", "-n", "2"],   # the one just saved
    "--reset-turns": ["-m", "chat", "--load-state", "{state_file}", "--reset-turns", "-n", "2"],
    "--pieces": ["-m", "tokenize", "--pieces", "-i", PROMPT],
    "-c": ["-c", "64", "-i", PROMPT, "-n", "2"],
    "--chunk": ["--chunk", "2", "-i", PROMPT, "-n", "2"],
    "--threads": ["--threads", "1", "-i", PROMPT, "-n", "2"],
    "--reference": ["--reference", "-i", PROMPT, "-n", "2"],
    "--logits-out": ["-m", "logits", "-i", "1 2 3", "--logits-out", "{logits_file}"],
    "--ppl-csv": ["-m", "ppl", "-i", COUNT, "--ppl-csv", "{csv_file}"],
    "--ppl-bucket": ["-m", "ppl", "-i", COUNT, "--ppl-bucket", "4"],
    "--ppl-tokens": ["-m", "ppl", "-i", COUNT, "--ppl-tokens", "6"],
    "--kl-base-save": ["-m", "ppl", "-i", COUNT, "--kl-base-save", "{kl_file}"],
    "--kl-base": ["-m", "ppl", "-i", COUNT, "--kl-base", "{kl_file}"],   # the file saved just above
    "--passkey-len": ["-m", "passkey", "--passkey-len", "120", "--passkey-depth", "0.5", "--passkey-trials", "1"],
    "--passkey-depth": ["-m", "passkey", "--passkey-len", "100", "--passkey-depth", "0,1", "--passkey-trials", "1"],
    "--passkey-trials": ["-m", "passkey", "--passkey-len", "100", "--passkey-depth", "1", "--passkey-trials", "2"],
    "--bench-pp": ["-m", "bench", "--bench-pp", "8,16", "--bench-tg", "2", "-r", "1"],
    "--bench-tg": ["-m", "bench", "--bench-pp", "8", "--bench-tg", "2,3", "-r", "1"],
    "--bench-depth": ["-m", "bench", "--bench-pp", "8", "--bench-tg", "2", "--bench-depth", "0,16", "-r", "1"],
    "--bench-state": ["-m", "bench", "--bench-pp", "8", "--bench-tg", "2", "-r", "1", "--bench-state", "16"],
    "-r": ["-m", "bench", "--bench-pp", "8", "--bench-tg", "2", "-r", "2"],
    "--json": ["-m", "bench", "--bench-pp", "8", "--bench-tg", "2", "-r", "1", "--json"],
    "--csv": ["-m", "bench", "--bench-pp", "8", "--bench-tg", "2", "-r", "1", "--csv"],
    "--window": ["--window", "8", "-i", PROMPT, "-n", "2"],
    "--sinks": ["--sinks", "2", "--window", "8", "-i", PROMPT, "-n", "2"],
    "--lminf": ["--lminf", "-i", PROMPT, "-n", "2"],
    "--lminf-limit": ["--lminf", "--lminf-limit", "100", "-i", PROMPT, "-n", "2"],
    "--kv-type": ["--kv-type", "q8", "-i", PROMPT, "-n", "2"],
    "--memory": ["--memory", "--window", "8", "--sinks", "2", "-i", PROMPT, "-n", "2"],
    "--memory-block": ["--memory", "--memory-block", "4", "--window", "8", "-i", PROMPT, "-n", "2"],
    "--memory-blocks": ["--memory", "--memory-blocks", "1", "--window", "8", "-i", PROMPT, "-n", "2"],
    "--memory-budget": ["--memory", "--memory-budget", "8", "--window", "8", "-i", PROMPT, "-n", "2"],
    "--memory-distance": ["--memory", "--memory-distance", "200", "--window", "8", "-i", PROMPT, "-n", "2"],
    "--memory-score": ["--memory", "--memory-score", "infllm", "--memory-block", "4", "--window", "8", "-i",
                       PROMPT, "-n", "2"],
    "--memory-repr": ["--memory", "--memory-score", "infllm", "--memory-repr", "2", "--memory-block", "4",
                      "--window", "8", "-i", PROMPT, "-n", "2"],
    "--rope-scaling": ["--rope-scaling", "linear", "--rope-factor", "2", "-i", PROMPT, "-n", "2"],
    "--rope-theta": ["--rope-theta", "200000", "-i", PROMPT, "-n", "2"],
    "--rope-factor": ["--rope-scaling", "dynamic", "--rope-factor", "2", "-i", PROMPT, "-n", "2"],
    "--rope-orig-ctx": ["--rope-scaling", "yarn", "--rope-factor", "4", "--rope-orig-ctx", "2048", "-i", PROMPT, "-n", "2"],
    "--yarn-beta-fast": ["--rope-scaling", "yarn", "--rope-factor", "4", "--yarn-beta-fast", "16", "-i", PROMPT, "-n", "2"],
    "--yarn-beta-slow": ["--rope-scaling", "yarn", "--rope-factor", "4", "--yarn-beta-slow", "2", "-i", PROMPT, "-n", "2"],
    "--yarn-attn-factor": ["--rope-scaling", "yarn", "--rope-factor", "4", "--yarn-attn-factor", "1.2", "-i", PROMPT, "-n", "2"],
    "-h": ["-h"],
    "--help": ["--help"],
    "--version": ["--version"],
}


def test_every_option_is_accepted(model, tmp_path):
    listed = usage_flags(raw("--help").stdout)
    assert set(ACCEPTED) == listed, "ACCEPTED must cover exactly the options of --help"
    prompt_file, logits_file, csv_file = tmp_path / "prompt.txt", tmp_path / "logits.f32", tmp_path / "ppl.csv"
    prompt_file.write_text(PROMPT)
    for flag, args in ACCEPTED.items():
        args = [a.format(prompt_file=prompt_file, logits_file=logits_file, csv_file=csv_file,
                         kl_file=tmp_path / "base.kld", state_file=tmp_path / "doc.state") for a in args]
        r = run(model, *args, check=False, input="Hi\n")
        assert r.returncode == 0, f"{flag}: {args} exited {r.returncode}: {r.stderr}"
        assert "error" not in r.stderr, f"{flag}: {r.stderr}"
        if flag not in ("-h", "--help", "--bos", "--logits-out"):
            assert r.stdout.strip(), f"{flag}: nothing generated"
    assert csv_file.read_text().startswith("first,last,tokens,mean_nll,ppl\n")
    for mode in ["generate", "chat", "tokenize", "logits", "ppl", "passkey", "bench"]:
        extra = {"chat": [], "logits": ["--logits-out", logits_file, "-i", "1 2"],
                 "passkey": ["--passkey-len", "100", "--passkey-depth", "1", "--passkey-trials", "1"],
                 "bench": ["--bench-pp", "8", "--bench-tg", "2", "-r", "1"]}.get(mode, ["-i", PROMPT])
        steps = ["-n", "2"] if mode in ("generate", "chat") else []
        r = run(model, "-m", mode, *steps, *extra, input="Hi\n")
        assert r.returncode == 0


def test_options_do_what_they_say(model, tmp_path):
    text = lambda *a: run(model, *a).stdout   # noqa: E731
    # --bos prepends one token to what tokenize prints
    plain, bos = ids_of(run(model, "-m", "tokenize", "-i", PROMPT)), ids_of(run(model, "-m", "tokenize", "--bos", "-i", PROMPT))
    assert bos[1:] == plain and len(bos) == len(plain) + 1
    # --ids: the prompt is ids and generate prints ids; -n: exactly that many
    assert len(ids_of(run(model, "--ids", "-i", " ".join(map(str, plain)), "-n", 5, "-t", 0))) == 5
    greedy = text("-i", PROMPT, "-n", 12, "-t", 0)
    assert greedy.strip()
    # -t 0 ignores the seed; -k 1, -p tiny and --min-p 1 all leave only the most likely token
    assert text("-i", PROMPT, "-n", 12, "-t", 0, "-s", 99) == greedy
    assert text("-i", PROMPT, "-n", 12, "-t", 1.5, "-k", 1, "-s", 3) == greedy
    assert text("-i", PROMPT, "-n", 12, "-t", 1.5, "-k", 0, "-p", 1e-6, "-s", 3) == greedy
    assert text("-i", PROMPT, "-n", 12, "-t", 1.5, "--min-p", 1, "-s", 3) == greedy
    # --threads and --chunk do not change the result
    assert text("-i", PROMPT, "-n", 12, "-t", 0, "--threads", 1) == greedy
    assert text("-i", PROMPT, "-n", 12, "-t", 0, "--chunk", 1) == greedy
    # the repetition penalty changes a counting continuation; --repeat-last-n 0 switches it off
    count = text("-i", COUNT, "-n", 12, "-t", 0)
    assert text("-i", COUNT, "-n", 12, "-t", 0, "--repeat-penalty", 3) != count
    assert text("-i", COUNT, "-n", 12, "-t", 0, "--repeat-penalty", 3, "--repeat-last-n", 0) == count
    # -c: the prompt must fit in the context; generation that fills it goes on through a window, or
    # stops with a note when the context is too small even for that
    r = run(model, "-i", PROMPT, "-n", 8, "-c", len(plain) - 1, check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "raise -c" in r.stderr
    r = run(model, "--ids", "-i", plain[0], "-n", 40, "-t", 0, "-c", 24)
    assert len(ids_of(r)) == 40 and "context full: going on with 4 sinks + a window of 20" in r.stderr
    r = run(model, "-i", PROMPT, "-n", 8, "-c", len(plain) + 1)   # 4 sinks + 1 chunk + 1 do not fit in 5
    assert "context full at" in r.stderr and "raise -c" in r.stderr
    assert text("-i", PROMPT, "-n", 12, "-t", 0, "-c", len(plain) + 12) == greedy
    # --logits-out writes (n, vocab) float32, the same with any --chunk
    a, b = tmp_path / "a.f32", tmp_path / "b.f32"
    run(model, "-m", "logits", "-i", " ".join(map(str, plain)), "--logits-out", a)
    run(model, "-m", "logits", "-i", " ".join(map(str, plain)), "--logits-out", b, "--chunk", 1)
    la, lb = np.fromfile(a, "<f4"), np.fromfile(b, "<f4")
    assert la.size == len(plain) * 49152 and np.isfinite(la).all()
    # (q8_0 weights meet activations rounded to int16 steps: where a chunk's float sums differ from
    # token-at-a-time ones in the last bit, a value can round one step the other way; measured
    # 1.1e-4 of the largest logit)
    assert np.abs(la - lb).max() <= 1e-3 * np.abs(la).max()


BAD = [
    ["--bogus"], ["--bogus", "1"], ["-x", "1"], ["-i", PROMPT, "--temperature", "1"],
    ["-i", PROMPT, "-n"], ["-i"], ["-i", PROMPT, "--system"], ["-i", PROMPT, "--logits-out"],
    ["-i", PROMPT, "-n", "abc"], ["-i", PROMPT, "-n", "1.5"], ["-i", PROMPT, "-n", "-2"], ["-i", PROMPT, "-n", ""],
    ["-i", PROMPT, "-n", "99999999999999999999"], ["-i", PROMPT, "-n", "5x"], ["-i", PROMPT, "-n", "0"],
    ["-i", PROMPT, "-t", "-1"], ["-i", PROMPT, "-t", "abc"], ["-i", PROMPT, "-t", "nan"], ["-i", PROMPT, "-t", "101"],
    ["-i", PROMPT, "-p", "0"], ["-i", PROMPT, "-p", "1.5"], ["-i", PROMPT, "-p", "inf"], ["-i", PROMPT, "-p", "-0.5"],
    ["-i", PROMPT, "-k", "-1"], ["-i", PROMPT, "-k", "2.5"],
    ["-i", PROMPT, "--min-p", "1.01"], ["-i", PROMPT, "--min-p", "-0.1"],
    ["-i", PROMPT, "--repeat-penalty", "0"], ["-i", PROMPT, "--repeat-penalty", "-1"],
    ["-i", PROMPT, "--repeat-last-n", "-1"],
    ["-i", PROMPT, "-s", "-1"], ["-i", PROMPT, "-s", "abc"],
    ["-i", PROMPT, "--threads", "0"], ["-i", PROMPT, "-c", "0"], ["-i", PROMPT, "-c", "-5"],
    ["-i", PROMPT, "--chunk", "0"], ["-i", PROMPT, "--chunk", "-1"],
    ["-m", "bogus", "-i", PROMPT], ["-m", "Generate", "-i", PROMPT],
    ["-i", PROMPT, "-f", "/dev/null"], [], ["-n", "5"],
    ["-m", "logits", "-i", "1 2 3"], ["-m", "chat", "-i", "hello", "-f", "x.txt"], ["-m", "chat", "-f", "-"],
    ["-i", PROMPT, "--sinks", "4"], ["-i", PROMPT, "--window", "0"], ["-i", PROMPT, "--sinks", "-1", "--window", "8"],
    ["-i", PROMPT, "--window", "8", "-c", "64"], ["-i", PROMPT, "--lminf-limit", "50"],
    ["-i", PROMPT, "--kv-type", "q4"], ["-i", PROMPT, "--kv-type", "F16"],
    # numbers are plain decimals: no hex, no leading space or '+', no inf
    ["-i", PROMPT, "-t", "0x1p-2"], ["-i", PROMPT, "-n", "0x10"], ["-i", PROMPT, "-n", " 5"],
    ["-i", PROMPT, "-t", " 0.5"], ["-i", PROMPT, "-k", "+5"], ["-i", PROMPT, "-t", "1e"],
    ["-i", PROMPT, "--rope-factor", "infinity"], ["-i", PROMPT, "-p", ".5."],
]


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a) or "(nothing)" for a in BAD])
def test_bad_command_line_exits_2_with_one_error_line(model, args):
    r = raw(model, *args, input="")
    assert r.returncode == 2, f"{args}: exit {r.returncode}, stderr {r.stderr!r}"
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{args}: {r.stderr!r}"


@pytest.mark.parametrize("args,words", [([], "no model file given"),
                                        (["-i", "hi", "M"], "model file comes first")])
def test_no_model_first_prints_usage_and_one_error(args, words):
    r = raw(*args)
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and lines[0].startswith("usage: run MODEL"), r.stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:] and words in lines[-1]


def test_an_unknown_option_is_named_wherever_it_stands(model):
    for args in (["-i", PROMPT, "--foo"], ["-i", PROMPT, "--window=8"], ["-i", PROMPT, "stray"]):
        r = raw(model, *args)
        assert r.returncode == 2 and r.stderr.startswith(f"error: unknown option {args[-1]}"), r.stderr


def test_same_seed_same_text(model):
    gen = lambda seed: run(model, "-i", PROMPT, "-n", 24, "-t", 1.0, "-s", seed).stdout   # noqa: E731
    a, b = gen(5), gen(5)
    assert a == b and a.strip()
    others = [gen(s) for s in (6, 7, 8)]
    print(f"\n[cli] -s 5: {a.strip()[:60]!r}; -s 6: {others[0].strip()[:60]!r}")
    assert sum(o != a for o in others) >= 2, "three other seeds (nearly) all reproduce seed 5's text"


def test_prompt_from_stdin_and_file(model, tmp_path):
    want = run(model, "-i", PROMPT, "-n", 10, "-t", 0).stdout
    assert want.strip()
    assert run(model, "-f", "-", "-n", 10, "-t", 0, input=PROMPT).stdout == want
    f = tmp_path / "p.txt"
    f.write_text(PROMPT)
    assert run(model, "-f", f, "-n", 10, "-t", 0).stdout == want
    # the bytes are verbatim: a trailing newline is part of the prompt
    got_nl = run(model, "-m", "tokenize", "-f", "-", input=PROMPT + "\n").stdout.split()
    assert got_nl[:-1] == run(model, "-m", "tokenize", "-i", PROMPT).stdout.split()
    # ids from stdin too
    ids = run(model, "-m", "tokenize", "-i", PROMPT).stdout
    assert ids_of(run(model, "--ids", "-f", "-", "-n", 4, "-t", 0, input=ids)) == \
        ids_of(run(model, "--ids", "-i", ids, "-n", 4, "-t", 0))


def test_prompt_file_errors_exit_1(model, tmp_path):
    for path, what in [(tmp_path, "is a directory"), (tmp_path / "missing.txt", "cannot open")]:
        r = run(model, "-f", path, "-n", 2, check=False)
        assert r.returncode == 1, f"-f {path}: exit {r.returncode}"
        assert r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], r.stderr


def option_table():
    """run.c's option_table: {flag: set of modes it applies to}."""
    src = open(os.path.join(ROOT, "run.c")).read()
    body = src[src.index("static const OptionInfo option_table[]"):]
    body = body[:body.index("};")]
    return {flag: modes for flag, modes in re.findall(r'\{ "(-[^"]+)", [01], ([^}]+) \}', body)}


# Options given to a mode they do not apply to: (the run, the misplaced option)
MISPLACED = [
    (["-i", PROMPT], ["--system", "Be brief."]), (["-m", "chat"], ["--ppl-csv", "x.csv"]),
    (["-i", PROMPT], ["--logits-out", "x.f32"]), (["-m", "ppl", "-i", PROMPT], ["--passkey-len", "100"]),
    (["-m", "passkey"], ["--bench-pp", "8"]), (["-i", PROMPT], ["--bench-depth", "0"]), (["-i", PROMPT], ["--json"]),
    (["-m", "ppl", "-i", PROMPT], ["-t", "0"]), (["-m", "logits", "--logits-out", "x.f32", "-i", "1 2"], ["-k", "3"]),
    (["-m", "tokenize", "-i", PROMPT], ["--min-p", "0.1"]), (["-m", "tokenize", "-i", PROMPT], ["-n", "3"]),
    (["-m", "bench"], ["-s", "3"]), (["-m", "ppl", "-i", PROMPT], ["--bos"]), (["-m", "tokenize", "-i", PROMPT], ["-c", "64"]),
    (["-m", "tokenize", "-i", PROMPT], ["--window", "8"]), (["-i", PROMPT], ["--ppl-tokens", "4"]), (["-i", PROMPT], ["-r", "2"]),
]


@pytest.mark.parametrize("where,option", MISPLACED, ids=[" ".join(w + o) for w, o in MISPLACED])
def test_an_option_outside_its_modes_is_refused(model, where, option):
    mode = where[where.index("-m") + 1] if "-m" in where else "generate"
    for args in (where + option, option + where):   # wherever it stands
        r = raw(model, *args, input="")
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.startswith(f"error: {option[0]} does not apply to -m {mode} (only to "), r.stderr
        assert len(r.stderr.splitlines()) == 1


def test_the_option_table_covers_the_parser():
    """Every option the parser knows has a row in option_table (which modes it applies to); the
    runs of test_every_option_is_accepted show each is accepted where ACCEPTED uses it."""
    assert set(option_table()) == parser_flags() - {"-h", "--help", "--version"}


def test_version_wherever_it_stands(model):
    src = open(os.path.join(ROOT, "run.c")).read()
    version = re.search(r'#define LONGRUN_VERSION "([^"]+)"', src).group(1)
    for args in [("--version",), (model, "--version"), (model, "-i", PROMPT, "--version"), ("x", "-n", "3", "--version")]:
        r = raw(*args)
        assert r.returncode == 0 and r.stdout == f"longrun {version}\n" and r.stderr == "", (args, r)


def test_sampling_runs_print_their_seed(model):
    """The start-up block names the seed of a sampled run, and -s with it repeats the run."""
    r = run(model, "-i", PROMPT, "-n", 12, "-t", 1.0)
    seed = re.search(r"^sampling: seed (\d+) ", r.stderr, re.M)
    assert seed, r.stderr
    again = run(model, "-i", PROMPT, "-n", 12, "-t", 1.0, "-s", seed.group(1))
    assert again.stdout == r.stdout and f"seed {seed.group(1)} " in again.stderr
    assert "sampling: greedy" in run(model, "-i", PROMPT, "-n", 2, "-t", 0).stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama trained for 128 positions, f32."""
    d = tmp_path_factory.mktemp("tiny")
    return export(tiny_llama(d / "hf"), d / "f32.bin", "f32")


def test_rope_scaling_raises_the_default_context(tiny):
    """--rope-scaling yarn --rope-factor 4 is meant for 4 x 128 positions: a 300-token prompt fits
    without -c, as the banner says; unscaled, the trained 128 refuse it."""
    ids = " ".join(str(i % 250 + 3) for i in range(300))
    r = run(tiny, "--ids", "-i", ids, "-n", 2, "-t", 0, check=False)
    assert r.returncode == 1 and "does not fit in a context of 128" in r.stderr, r.stderr
    r = run(tiny, "--ids", "-i", ids, "-n", 2, "-t", 0, "--rope-scaling", "yarn", "--rope-factor", 4)
    assert "meant for 512 tokens" in r.stderr and "context 302 tokens" in r.stderr, r.stderr
    assert len(ids_of(r)) == 2


@pytest.mark.parametrize("scaling", ["yarn", "linear", "dynamic", "llama3"])
def test_rope_scaling_without_a_factor_is_never_x1(tiny, scaling):
    """A new --rope-scaling without --rope-factor takes S = -c / L0 and says so, or is refused."""
    r = run(tiny, "--ids", "-i", "5 6 7", "-n", 2, "--rope-scaling", scaling, check=False)
    assert r.returncode == 1 and f"--rope-scaling {scaling} needs --rope-factor" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1
    r = run(tiny, "--ids", "-i", "5 6 7", "-n", 2, "--rope-scaling", scaling, "-c", 384)
    assert f"RoPE {scaling} x3 from 128" in r.stderr and "RoPE factor 3 = -c 384 / 128" in r.stderr, r.stderr
    # --rope-scaling none needs no factor
    run(tiny, "--ids", "-i", "5 6 7", "-n", 2, "--rope-scaling", "none")


def test_generate_echoes_the_prompt(model):
    """Text out: the prompt, then its continuation (as llama.cpp and llama2.c print); --no-echo
    prints the continuation alone; --ids prints only the generated ids."""
    echoed = run(model, "-i", PROMPT, "-n", 8, "-t", 0).stdout
    alone = run(model, "-i", PROMPT, "-n", 8, "-t", 0, "--no-echo").stdout
    assert echoed == PROMPT + alone and alone.strip()
    ids = run(model, "-m", "tokenize", "-i", PROMPT).stdout
    assert len(ids_of(run(model, "--ids", "-i", ids, "-n", 3, "-t", 0))) == 3


def test_stop_strings_end_the_reply_unprinted(model):
    full = run(model, "-i", COUNT, "-n", 16, "-t", 0, "--no-echo").stdout
    assert full.startswith(" 9, 10, 11,"), full
    r = run(model, "-i", COUNT, "-n", 16, "-t", 0, "--no-echo", "--stop", "11", "--stop", "never")
    assert r.stdout == " 9, 10, \n", r.stdout
    assert re.search(r"decode .* \((\d+) tokens\)", r.stderr).group(1) == str(len(ids_of(
        run(model, "-m", "tokenize", "-i", COUNT + " 9, 10, 11")))
        - len(ids_of(run(model, "-m", "tokenize", "-i", COUNT))))


def test_a_slow_prefill_shows_progress(model):
    """Progress on stderr once prefill has taken 2 s, however short the prompt."""
    text = " ".join(f"{i}," for i in range(1, 80))    # ~160 tokens, one at a time on one thread
    r = run(model, "-i", text, "-n", 1, "--chunk", 1, "--threads", 1)
    took = float(re.search(r"first token after ([\d.]+) s", r.stderr).group(1))
    assert took > 2.5, f"prefill took only {took} s: make the prompt longer"
    assert re.search(r"prefill \d+ / \d+ tokens, \d+ tok/s", r.stderr), r.stderr


def test_tokenize_pieces_spell_each_token(model, smollm2_gguf):
    """--pieces: one line per id with its text, bytes escaped; each piece is HF's decode of that id."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))
    text = 'Say "hi"\n\tto C:\\dir, caf\u00e9.'
    ids = hf.encode(text, add_special_tokens=False)
    lines = run(model, "-m", "tokenize", "--pieces", "-i", text).stdout.splitlines()
    assert [int(line.split("\t")[0]) for line in lines] == ids
    for line, i in zip(lines, ids):
        quoted = line.split("\t", 1)[1]
        assert quoted[0] == quoted[-1] == '"'
        got = quoted[1:-1].encode().decode("unicode_escape").encode("latin-1")   # \xNN are bytes
        assert got == hf.decode([i]).encode("utf-8") or got.decode("utf-8", "replace") == hf.decode([i]), (line, i)


def test_show_prompt_prints_what_generate_reads(model):
    r = run(model, "-i", PROMPT, "-n", 1, "-t", 0, "--show-prompt")
    ids = run(model, "-m", "tokenize", "-i", PROMPT).stdout.strip()   # SmolLM2 adds no BOS
    assert f"--- the model reads (4 tokens) ---\n{PROMPT}\n--- as ids ---\n{ids}\n---\n" in r.stderr, r.stderr


@pytest.mark.parametrize("window", [["--lminf"], ["--sinks", "4", "--window", "100"]])
def test_a_windowed_cache_holds_only_what_the_run_reaches(tiny, window):
    """--lminf and --window size each layer's ring to the run's reach (prompt + -n), not the whole
    window: 2 layers x (sinks + 5) slots for 3 prompt ids and -n 2; -n 300 gets the whole ring."""
    sinks = 10 if window == ["--lminf"] else 4
    r = run(tiny, "--ids", "-i", "5 6 7", "-n", 2, "-t", 0, *window)
    assert f"{2 * (sinks + 5)} slots in all" in r.stderr, r.stderr
    ring = (128 if window == ["--lminf"] else 100) + 3 - 1   # window + chunk - 1
    r = run(tiny, "--ids", "-i", "5 6 7", "-n", 300, "-t", 0, *window)
    assert f"{2 * (sinks + ring)} slots in all" in r.stderr, r.stderr
