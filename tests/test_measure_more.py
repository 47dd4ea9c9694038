"""More of the measurement modes: --ppl-tokens tokenizes only what it needs, the KL divergence
against a saved base run (--kl-base-save / --kl-base), and -m bench's warm-up, configuration,
CSV and sweeps over --threads and --kv-type.

KL references are computed here in numpy from the logits of `-m logits` runs (float64), never
from the engine's own KL output."""
import re
import time

import numpy as np
import pytest
from conftest import export, run

PPL_VALUE = r"perplexity ([0-9.]+) .*over (\d+) predicted tokens \(mean NLL ([0-9.]+)"
PPL_LINE = r"perplexity ([0-9.]+) ± ([0-9.]+) over (\d+) predicted tokens \(mean NLL ([0-9.]+) ± ([0-9.]+)\)"


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("measure_more")
    return d, export(smollm2_gguf, d / "q8.bin", "q8_0")


def peak_rss(stdout):
    return float(re.search(r"peak RSS (\d+) MB", stdout).group(1))


def test_ppl_tokens_tokenizes_only_a_prefix(smol, tmp_path):
    """--ppl-tokens 100 on a 9 MB file: the same perplexity as on the first 100 ids of a full
    tokenization, without the memory of tokenizing all 9 MB (which cost +114 MB of peak RSS)."""
    d, model = smol
    rng = np.random.default_rng(1)
    words = open(__file__).read().split()
    text = " ".join(rng.choice(words, 1_500_000))
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text(text)
    small.write_text(text[:3000])
    ids = run(model, "-m", "tokenize", "-f", small).stdout.split()[:100]
    want = re.search(PPL_VALUE, run(model, "-m", "ppl", "--ids", "-i", " ".join(ids), "--threads", 1).stdout)
    base = run(model, "-m", "ppl", "-f", small, "--ppl-tokens", 100, "--threads", 1)
    t0 = time.time()
    r = run(model, "-m", "ppl", "-f", big, "--ppl-tokens", 100, "--threads", 1)
    seconds = time.time() - t0
    got = re.search(PPL_VALUE, r.stdout)
    extra = peak_rss(r.stdout) - peak_rss(base.stdout)
    print(f"\n[ppl-tokens] 9 MB file, 100 tokens: {seconds:.1f} s, peak RSS {extra:+.0f} MB over a 3 KB "
          f"file; perplexity {got.group(1)} (first 100 ids of the full tokenization: {want.group(1)})")
    assert got.groups() == want.groups()
    assert extra < 45   # the text itself (9 MB, read into a doubling buffer); tokenizing it all: +114
