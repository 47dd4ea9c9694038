"""How ./run fails: it never destroys its inputs, never leaves a partial output file, reports a
write error on standard output with exit 1, honours the first Ctrl-C in every long loop and
cleans up on SIGTERM, does not hang on a named pipe, and samples a valid token whatever the
options. Each case once failed (a red-team report listed them); the tiny model with a tokenizer
(a committed fuzz seed) keeps them fast, and the sanitizer build runs where memory is at stake."""
import glob
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import time

import pytest
from conftest import ROOT, RUN, RUN_ASAN, need, plant_tmp, run

SEED = os.path.join(ROOT, "tests", "fuzz", "seeds", "model", "llama-tokenizer.bin")
TEXT = "Hello world, this is a tiny corpus for a tiny tokenizer. Numbers 12345 and 3.14."


@pytest.fixture
def model(tmp_path):
    """A private copy of the seed model: some tests try to overwrite it."""
    path = tmp_path / "model.bin"
    shutil.copy(need(SEED, "tests/fuzz/make_seeds.py writes it"), path)
    return path


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def error_line(r):
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def start(args, **kw):
    return subprocess.Popen([need(RUN, "make"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


# ----------------------------------------------------------------------------
# Sampling is total

@pytest.mark.parametrize("options", [["-k", "0"], ["-k", "1"], ["--min-p", "0.1"], ["-k", "0", "-p", "0.5"],
                                     ["-k", "3", "--repeat-penalty", "0.001"]])
def test_tiny_temperature_samples_the_most_likely_token(model, options):
    """-t 1e-45 (as -t 1e-38 on a real model) once overflowed logits / T to inf, the softmax to NaN, and sample() read before
    its candidate list. A temperature that small is greedy decoding."""
    asan = need(RUN_ASAN, "make run-asan")
    greedy = run(model, "--ids", "-i", "5 6 7", "-n", 6, "-t", 0, *options, binary=asan).stdout
    tiny = run(model, "--ids", "-i", "5 6 7", "-n", 6, "-t", "1e-45", *options, binary=asan).stdout
    assert tiny == greedy and len(greedy.split()) == 6, (tiny, greedy)


# ----------------------------------------------------------------------------
# Inputs are never overwritten; outputs are whole or absent

@pytest.mark.parametrize("mode", ["logits", "ppl"])
def test_output_onto_the_model_is_refused(model, mode):
    before = digest(model)
    args = ["-m", "logits", "-i", "1 2 3", "--logits-out", model] if mode == "logits" else \
        ["-m", "ppl", "-i", TEXT, "--ppl-csv", model]
    r = run(model, *args, check=False)
    assert r.returncode == 1 and "would overwrite the input" in error_line(r)
    assert digest(model) == before


def test_ppl_csv_onto_the_text_is_refused(model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    r = run(model, "-m", "ppl", "-f", text, "--ppl-csv", text, check=False)
    assert r.returncode == 1 and "would overwrite the input" in error_line(r)
    assert text.read_text() == TEXT


def limit_file_size(max_bytes):
    """For preexec_fn: writes past max_bytes fail with EFBIG, as on a full disk (SIGXFSZ,
    which would kill the process instead, is ignored; an ignored signal stays so across exec)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def test_a_failed_logits_write_leaves_no_file(model, tmp_path):
    out = tmp_path / "logits.f32"
    out.write_bytes(b"an older result")
    ids = " ".join(str(i) for i in range(5, 45))   # 40 x 320 floats: past the 4096-byte limit
    r = run(model, "-m", "logits", "-i", ids, "--logits-out", out, "--chunk", 4, check=False,
            preexec_fn=limit_file_size(4096))
    assert r.returncode == 1 and "write failed" in error_line(r), r.stderr
    assert out.read_bytes() == b"an older result"
    assert sorted(os.listdir(tmp_path)) == ["logits.f32", "model.bin"]


def test_a_failed_csv_write_still_prints_the_perplexity(model, tmp_path):
    csv = tmp_path / "ppl.csv"
    r = run(model, "-m", "ppl", "-i", TEXT, "--ppl-csv", csv, "--ppl-bucket", 1, check=False,
            preexec_fn=limit_file_size(64))
    assert r.returncode == 1 and "write failed" in error_line(r), r.stderr
    assert r.stdout.startswith("perplexity "), r.stdout
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_an_existing_name_tmp_is_never_written_through(model, tmp_path, kind):
    """The temporary used to be NAME.tmp, opened for writing: a file of that name was lost, and
    a symlink planted there redirected the logits onto its target."""
    out = tmp_path / "logits.f32"
    untouched = plant_tmp(out, kind)
    run(model, "-m", "logits", "-i", "1 2 3", "--logits-out", out)
    assert untouched() and out.stat().st_size == 3 * 320 * 4 and not glob.glob(str(out) + ".tmp.*")


def test_outputs_are_written_whole(model, tmp_path):
    out = tmp_path / "ppl.csv"
    r = run(model, "-m", "ppl", "-i", TEXT, "--ppl-csv", out, "--ppl-bucket", 4)
    rows = out.read_text().splitlines()
    assert rows[0] == "first,last,tokens,mean_nll,ppl" and len(rows) > 2, rows
    assert sorted(os.listdir(tmp_path)) == ["model.bin", "ppl.csv"] and r.stdout.startswith("perplexity")


# ----------------------------------------------------------------------------
# Standard output's errors are errors

STDOUT_RUNS = {
    "tokenize": (["-m", "tokenize", "-i", TEXT], None),
    "generate": (["-i", TEXT, "-n", 4, "-t", 0], None),
    "ppl": (["-m", "ppl", "-i", TEXT], None),
    "chat": (["-m", "chat", "-n", 4, "-t", 0], "hello\n"),
}


@pytest.mark.parametrize("mode", list(STDOUT_RUNS))
@pytest.mark.parametrize("where", ["/dev/full", "closed"])
def test_a_failed_stdout_write_exits_1(model, mode, where):
    args, stdin = STDOUT_RUNS[mode]
    cmd = [need(RUN, "make"), str(model), *map(str, args)]
    if where == "closed":   # as `>&-` in a shell
        r = subprocess.run(cmd, input=stdin, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    else:
        with open(where, "w") as full:
            r = subprocess.run(cmd, input=stdin, stdout=full, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1, f"exit {r.returncode}: {r.stderr[-1500:]}"
    print(f"\n[{mode} > {where}] {error_line(r)}")


# ----------------------------------------------------------------------------
# Signals

def wait_for(condition, seconds=60):
    """Poll until condition() holds (a busy machine may take a while to get there)."""
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out waiting for the run to get going"
        time.sleep(0.05)


def long_ids(tmp_path):
    """A file of 60,000 token ids: token-at-a-time logits over it take minutes."""
    path = tmp_path / "ids.txt"
    path.write_text(" ".join(str(5 + i % 300) for i in range(60000)))
    return path

def test_the_first_ctrl_c_stops_logits_and_leaves_no_file(model, tmp_path):
    out = tmp_path / "logits.f32"
    p = start([model, "-m", "logits", "-f", long_ids(tmp_path), "--logits-out", out, "--chunk", 1])
    wait_for(lambda: glob.glob(str(out) + ".tmp.*"))   # the signals are caught from here on
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert p.returncode == 1 and "interrupted after" in err, err[-1000:]
    assert sorted(os.listdir(tmp_path)) == ["ids.txt", "model.bin"]


def test_the_first_ctrl_c_stops_one_long_chunk(tmp_path):
    """-m logits runs the whole prompt as one chunk: a Ctrl-C during it stops at the next layer
    (it used to run to the end and write the whole file, exit 0)."""
    model = need(os.path.join(os.path.dirname(SEED), "qwen2-q8.bin"), "a committed fuzz seed")
    out = tmp_path / "logits.f32"
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str(i % 64) for i in range(40000)))
    p = start([model, "-m", "logits", "-f", ids, "--logits-out", out])
    wait_for(lambda: glob.glob(str(out) + ".tmp.*"))
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "interrupted after 0 of 40000 tokens" in err, err[-1000:]
    assert sorted(os.listdir(tmp_path)) == ["ids.txt"]


def test_the_first_ctrl_c_stops_bench_decode(model):
    p = start([model, "-m", "bench", "--bench-pp", 1, "--bench-tg", 60000, "-r", 1])
    wait_for(lambda: p.stdout.readline().startswith("|---"))   # the table has begun: decoding
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert p.returncode == 1 and "interrupted" in err, err[-1000:]


def test_ctrl_c_ends_an_endless_generation_with_its_stats():
    """-n -1 through a window never ends by itself (this model has no tokenizer, so no end of
    text); Ctrl-C ends it cleanly, stats printed."""
    model = need(os.path.join(os.path.dirname(SEED), "llama-f32.bin"), "a committed fuzz seed")
    p = start([model, "--ids", "-i", "5 6 7", "-n", -1, "--sinks", 2, "--window", 16])
    first = []
    wait_for(lambda: first.append(p.stdout.read(400)) or True)   # past the 16-key window
    p.send_signal(signal.SIGINT)
    out = first[0] + p.stdout.read()   # (communicate() would miss what the text reader holds)
    err = p.stderr.read()
    p.wait(timeout=10)
    generated = len(out.split())
    assert p.returncode == 0 and generated > 64, (p.returncode, generated, err[-500:])
    assert f"({generated} tokens)" in err   # the stats count what was printed


def test_sigterm_removes_the_partial_file(model, tmp_path):
    out = tmp_path / "logits.f32"
    p = start([model, "-m", "logits", "-f", long_ids(tmp_path), "--logits-out", out, "--chunk", 1])
    wait_for(lambda: glob.glob(str(out) + ".tmp.*"))
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=10)
    assert p.returncode == 128 + signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == ["ids.txt", "model.bin"]


# ----------------------------------------------------------------------------
# Paths that are not files

def test_a_named_pipe_as_the_model_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    r = subprocess.run([need(RUN, "make"), str(fifo), "-i", "hi"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "not a regular file" in error_line(r)


def test_an_output_directory_is_refused(model, tmp_path):
    r = run(model, "-m", "logits", "-i", "1 2", "--logits-out", tmp_path, check=False)
    assert r.returncode == 1 and "is a directory" in error_line(r)
