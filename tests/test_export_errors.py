"""export.py on bad inputs: a truncated safetensors or GGUF file, a config that does not match
the tensors, an unsupported architecture, a missing or broken config.json. Each exits 1 with an
`error:` line naming the problem, and leaves no output behind: OUT is written as OUT.tmp and
renamed only when complete, so an OUT that existed before is untouched."""
import json
import os
import shutil
import subprocess

import pytest
from conftest import PYTHON, ROOT, tiny_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("export_errors") / "hf")


def edit_config(d, **changes):
    cfg = json.load(open(d / "config.json"))
    cfg.update(changes)
    json.dump(cfg, open(d / "config.json", "w"))


def cut_file(path, keep):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep(len(data))])


CASES = {
    "safetensors_cut_in_data": (lambda d: cut_file(d / "model.safetensors", lambda n: n - 100), "runs past the end"),
    "safetensors_cut_in_header": (lambda d: cut_file(d / "model.safetensors", lambda n: 50), "bad header"),
    "safetensors_missing": (lambda d: os.remove(d / "model.safetensors"), "no model.safetensors"),
    "unsupported_architecture": (lambda d: edit_config(d, architectures=["GPT2LMHeadModel"]), "not supported"),
    "config_dim_mismatch": (lambda d: edit_config(d, hidden_size=128), "expected [256, 128]"),
    "config_more_layers": (lambda d: edit_config(d, num_hidden_layers=3), "missing tensor"),
    "config_heads_not_dividing": (lambda d: edit_config(d, num_key_value_heads=3), "multiple"),
    "config_missing": (lambda d: os.remove(d / "config.json"), "no config.json"),
    "config_not_json": (lambda d: open(d / "config.json", "w").write("{not json"), "cannot read"),
    "unsupported_activation": (lambda d: edit_config(d, hidden_act="gelu"), "hidden_act"),
}


def export_fails(source, out, words, *extra):
    out.write_bytes(b"an older export")
    r = subprocess.run([PYTHON, os.path.join(ROOT, "export.py"), str(source), str(out), *extra],
                       capture_output=True, text=True)
    assert r.returncode == 1, f"exit {r.returncode}: {r.stderr[-1500:]}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert out.read_bytes() == b"an older export", "a failed export touched OUT"
    assert not os.path.exists(str(out) + ".tmp"), "a failed export left OUT.tmp"
    return errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_hf_source(hf_dir, tmp_path, case):
    damage, words = CASES[case]
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    damage(d)
    print(f"\n[{case}] {export_fails(d, tmp_path / 'out.bin', words)}")


@pytest.mark.parametrize("keep", [3000, 5_000_000], ids=["cut_in_metadata", "cut_in_tensor_data"])
@pytest.mark.parametrize("tokenizer_only", [False, True], ids=["model", "tokenizer_only"])
def test_truncated_gguf(smollm2_gguf, tmp_path, keep, tokenizer_only):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        cut.write_bytes(f.read(keep))
    extra = ["--tokenizer-only"] if tokenizer_only else []
    print(f"\n[gguf {keep}] {export_fails(cut, tmp_path / 'out.bin', 'truncated or corrupt', *extra)}")


def test_not_a_model_at_all(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    export_fails(junk, tmp_path / "out.bin", "truncated or corrupt")
    export_fails(tmp_path / "nowhere", tmp_path / "out.bin", "no such file")
