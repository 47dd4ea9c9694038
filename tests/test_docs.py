"""README.md keeps its promises: run.c within the stated line budget, every option of
`./run --help` and every mode documented in README's tables."""
import os
import re

from conftest import ROOT, run


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_run_c_within_line_budget():
    m = re.search(r"run\.c stays under\s+([\d,]+)\s+lines", readme())
    assert m, "README.md must state run.c's line budget as 'run.c stays under N lines'"
    budget = int(m.group(1).replace(",", ""))
    with open(os.path.join(ROOT, "run.c"), encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    print(f"\n[docs] run.c: {lines} lines, budget {budget}")
    assert lines < budget


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
