"""Long runs stay clean. Every mode, on the tiny fuzz-seed model (a Llama with a byte-level
tokenizer and a ChatML template), runs under the ASan/UBSan build with LeakSanitizer on: no leak,
no report, exit 0, including the paths that wrap a ring (window + sinks), switch to streaming
when the context fills, and use f16 / q8 caches. And a 1M-token sink + window generation peaks
at the memory of a 100K one."""
import os
import re
import subprocess

import pytest
from conftest import ROOT, RUN, RUN_ASAN, need

SEED = os.path.join(ROOT, "tests", "fuzz", "seeds", "model", "llama-tokenizer.bin")
NO_EOS = os.path.join(ROOT, "tests", "fuzz", "seeds", "model", "llama-f32.bin")   # no tokenizer, no end of text
TEXT = "In the beginning was the word, and the word was with the tokens. " * 40

MODES = {
    "generate": (["-i", "Hello world", "-n", 40], None),
    "generate_ring": (["--ids", "-i", "1 2 3", "-n", 300, "--sinks", 4, "--window", 16, "--kv-type", "f16"], None),
    "context_full": (["--ids", "-i", "1 2 3", "-n", 200, "-c", 32], None),
    "lminf_q8": (["--ids", "-i", "1 2 3", "-n", 100, "--lminf", "--window", 24, "--kv-type", "q8"], None),
    "chat": (["-m", "chat", "-n", 20, "--system", "Be brief."], "hi\nand again\n"),
    "tokenize": (["-m", "tokenize", "-f", "{text}"], None),
    "logits": (["-m", "logits", "-i", "1 2 3 4", "--logits-out", "{tmp}/l.f32"], None),
    "ppl": (["-m", "ppl", "-f", "{text}", "-c", 4096, "--ppl-csv", "{tmp}/p.csv", "--ppl-bucket", 100], None),
    "ppl_stream": (["-m", "ppl", "-f", "{text}", "--sinks", 4, "--window", 32, "--chunk", 16], None),
    "passkey": (["-m", "passkey", "--passkey-len", 512, "--passkey-depth", 0.5, "--passkey-trials", 1], None),
    "bench": (["-m", "bench", "--bench-pp", 16, "--bench-tg", 8, "--bench-depth", "0,32", "-r", 1], None),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_no_leak_in_any_mode(tmp_path, mode):
    args, stdin = MODES[mode]
    (tmp_path / "text.txt").write_text(TEXT)
    args = [str(a).format(text=tmp_path / "text.txt", tmp=tmp_path) for a in args]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:halt_on_error=1")
    model = NO_EOS if "--ids" in args else SEED   # ids: the model without a tokenizer generates all -n tokens
    r = subprocess.run([need(RUN_ASAN, "make run-asan"), need(model, "tests/fuzz/make_seeds.py"), *args], input=stdin,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LeakSanitizer" not in r.stderr and "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr
    if "--ids" in args and "-n" in args:
        assert len(r.stdout.split()) == int(args[args.index("-n") + 1])
    print(f"\n[{mode}] clean; {(r.stderr.strip().splitlines() or [''])[-1][:100]}")


def test_a_million_tokens_in_the_memory_of_100k():
    peak = {}
    for n in (100_000, 1_000_000):
        r = subprocess.run([need(RUN, "make"), NO_EOS, "--ids", "-i", "1 2 3", "-n", str(n), "-t", "1", "--sinks", "4",
                            "--window", "64", "--threads", "1"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(r.stdout.split()) == n
        peak[n] = float(re.search(r"peak RSS (\d+) MB", r.stderr).group(1))
    print(f"\n[1M] generate 100K -> 1M tokens with 4 sinks + window 64: peak RSS {peak[100_000]:.0f} -> "
          f"{peak[1_000_000]:.0f} MB")
    assert abs(peak[1_000_000] - peak[100_000]) <= 1
