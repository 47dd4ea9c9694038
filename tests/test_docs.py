"""README.md keeps its promises: C source lines a reader can take in (at most 100 characters),
every option of `./run --help` and every mode documented in README's tables."""
import os
import re

from conftest import ROOT, run


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


SOURCES = ["run.c", "tokenizer.c", "model.h"]   # tokenizer_unicode.h is generated tables


def test_lines_fit_a_reader():
    """No line of the C sources is longer than 100 characters."""
    long_lines = []
    for name in SOURCES:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            lines = enumerate(f, 1)
            long_lines += [f"{name}:{n}" for n, line in lines if len(line.rstrip("\n")) > 100]
    print(f"\n[docs] {len(long_lines)} lines over 100 characters in {', '.join(SOURCES)}")
    assert not long_lines, long_lines[:20]


def test_every_option_and_mode_is_documented():
    help_text = run("-h").stdout   # `run -h` prints usage to stdout and exits 0
    options = sorted(set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", help_text)))
    documented = set(re.findall(r"`(--?[a-z][\w-]*)", readme()))
    missing = [o for o in options if o not in documented]
    assert not missing, f"options in --help but not in README.md: {missing}"
    modes = re.search(r"-m MODE\s+(.*?)\(default", help_text).group(1)
    for mode in re.findall(r"[a-z]+", modes):
        assert f"`{mode}`" in readme(), f"mode {mode} is not documented in README.md"
    print(f"\n[docs] {len(options)} options and every mode documented")
