"""export.py on bad inputs: a truncated safetensors or GGUF file, a config that does not match
the tensors, an unsupported architecture, a missing or broken config.json, config values of the
wrong type or outside what ./run accepts. Each exits 1 with one `error:` line naming the problem
(never a traceback), and leaves no output behind: OUT is written as a new OUT.tmp.XXXXXX and
renamed only when complete, so an OUT that existed before is untouched. An output that is one of the inputs is
refused before anything is written, and SIGTERM / SIGINT during the export remove the temporary."""
import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import time

import pytest
from conftest import PYTHON, ROOT, plant_tmp, tiny_llama


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


def set_header_length(path, n):
    """Overwrite a safetensors file's leading u64 (its JSON header's length)."""
    data = bytearray(open(path, "rb").read())
    data[:8] = struct.pack("<Q", n)
    open(path, "wb").write(bytes(data))


def without_head_dim(d, **changes):
    """As edit_config, with head_dim left out (as in most configs): export.py then derives it
    as hidden_size / num_attention_heads, the division a bad value must not reach."""
    cfg = json.load(open(d / "config.json"))
    cfg.pop("head_dim")
    cfg.update(changes)
    json.dump(cfg, open(d / "config.json", "w"))


def rope(**parameters):
    """A config edit setting rope_parameters (v5 spelling), theta 1e4 unless given."""
    return lambda d: edit_config(d, rope_parameters={"rope_theta": 1e4, **parameters})


YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)


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
    # values that once gave a traceback
    "safetensors_header_length_2_63": (
        lambda d: set_header_length(d / "model.safetensors", 1 << 63), "bad header"),
    "num_attention_heads_0": (
        lambda d: without_head_dim(d, num_attention_heads=0), "num_attention_heads"),
    "hidden_size_null": (lambda d: without_head_dim(d, hidden_size=None), "hidden_size"),
    "rope_factor_string": (rope(rope_type="linear", factor="x"), "factor = 'x' must be a number"),
    "config_is_a_list": (
        lambda d: json.dump([1, 2], open(d / "config.json", "w")), "not a JSON object"),
    "architectures_a_string": (lambda d: edit_config(d, architectures="LlamaForCausalLM"),
                               "architectures = 'LlamaForCausalLM' must be a list"),
    # values that once gave a file ./run refuses (or runs into NaN logits with): run.c's ranges
    "yarn_factor_nan": (rope(**{**YARN, "factor": float("nan")}), "factor = nan"),
    "rope_theta_negative": (rope(rope_type="default", rope_theta=-1), "rope_theta -1"),
    "yarn_factor_below_1": (rope(**{**YARN, "factor": 0.5}), "factor 0.5"),
    "linear_factor_1e7": (rope(rope_type="linear", factor=1e7), "factor 10000000.0"),
    "yarn_betas_reversed": (rope(**YARN, beta_fast=1.0, beta_slow=32.0), "beta_fast > beta_slow"),
    "yarn_attention_factor_100": (rope(**YARN, attention_factor=100.0), "attention_factor 100"),
    # the derived attention factor g(s, mscale) / g(s, mscale_all_dim), g(s, m) = 0.1 m ln s + 1:
    # ~1e29, or a divisor that is 0 but for float32 rounding (m = -10 / ln 4)
    "yarn_mscale_pair_huge": (
        rope(**YARN, mscale=1e30, mscale_all_dim=1e-30), "attention factor of 1.4e+29"),
    "yarn_mscale_divisor_near_0": (
        rope(**YARN, mscale=1.0, mscale_all_dim=-10 / 1.3862943611198906),
        "attention factor of -3.6e+08"),
    "llama3_freq_factors_reversed": (
        rope(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
             original_max_position_embeddings=32), "high_freq_factor > low_freq_factor"),
    # 1 / 1e-45 overflows float32: run.c's frequency table would hold inf
    "longrope_factor_subnormal": (
        rope(rope_type="longrope", factor=2.0, original_max_position_embeddings=32,
             short_factor=[1.0] * 7 + [1e-45], long_factor=[1.0] * 8), "rope.short_factor holds"),
    "rms_norm_eps_1": (lambda d: edit_config(d, rms_norm_eps=1.0), "rms_norm_eps"),
    "max_position_embeddings_2_21": (lambda d: edit_config(d, max_position_embeddings=1 << 21),
                                     "max_position_embeddings"),
    "sliding_window_negative": (
        lambda d: edit_config(d, architectures=["MistralForCausalLM"], sliding_window=-5),
        "sliding_window"),
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
    assert not glob.glob(str(out) + ".tmp*"), "a failed export left its temporary"
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


# ----------------------------------------------------------------------------
# An output that is one of the inputs

def byte_level_tokenizer_json(path):
    """A valid GPT-2 style tokenizer.json: the 256 byte symbols and no merges (tiny_llama's 256)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(path))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, hf_dir):
    """Exportable inputs of each kind: an HF directory with a tokenizer.json, the same model in
    shards, and a GGUF file."""
    from test_export_formats import write_gguf
    from transformers import LlamaForCausalLM
    root = tmp_path_factory.mktemp("sources")
    shutil.copytree(hf_dir, root / "hf")
    byte_level_tokenizer_json(root / "hf" / "tokenizer.json")
    shards = root / "sharded"
    LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(shards, max_shard_size="100KB")
    write_gguf(root / "tiny.gguf", "Q8_0")
    return root


def read_all(paths):
    return {str(p): open(p, "rb").read() for p in paths}


# (source, output) relative to a fresh copy of the sources; None: made by the test
OVERWRITES = {
    "gguf_onto_itself": ("tiny.gguf", "tiny.gguf"),
    "gguf_by_another_path": ("tiny.gguf", "../copy/./tiny.gguf"),
    "model_safetensors": ("hf", "hf/model.safetensors"),
    "config_json": ("hf", "hf/config.json"),
    "tokenizer_json": ("hf", "hf/tokenizer.json"),
    "a_shard": ("sharded", "sharded/model-00002-of-00005.safetensors"),
    "shard_index": ("sharded", "sharded/model.safetensors.index.json"),
    "symlink_to_the_gguf": ("tiny.gguf", None),
    "hard_link_to_a_shard": ("sharded", None),
}


@pytest.mark.parametrize("case", list(OVERWRITES))
def test_output_is_an_input(sources, tmp_path, case):
    """export.py SRC.gguf SRC.gguf, or DIR DIR/model.safetensors, ... replaced the source and
    exited 0. Now: one error line, exit 1, every input byte-identical, no OUT.tmp."""
    work = tmp_path / "copy"
    shutil.copytree(sources, work)
    source, out = OVERWRITES[case]
    if case == "symlink_to_the_gguf":
        out = "link.bin"
        os.symlink(work / "tiny.gguf", work / out)
    elif case == "hard_link_to_a_shard":
        out = "hard.bin"
        os.link(work / "sharded" / "model-00001-of-00005.safetensors", work / out)
    inputs = [p for p in work.rglob("*") if p.is_file() and not p.is_symlink()]
    before = read_all(inputs)
    script = os.path.join(ROOT, "export.py")
    r = subprocess.run([PYTHON, script, str(work / source), str(work / out)], capture_output=True,
                       text=True)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    print(f"\n[{case}] exit {r.returncode}: {errors}")
    assert r.returncode == 1, f"exit {r.returncode}: {r.stderr[-800:]}"
    assert len(errors) == 1 and "is the input" in errors[0], r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert read_all(inputs) == before, "an input changed"
    assert not glob.glob(str(work / out) + ".tmp*")


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_an_existing_out_tmp_is_never_written_through(sources, tmp_path, kind):
    """OUT.tmp used to be a fixed name, opened for writing: a user's file of that name was
    overwritten, and a symlink planted there (in /tmp, say) redirected the export onto its
    target. The temporary is now a new file of a unique name."""
    out = tmp_path / "out.bin"
    untouched = plant_tmp(out, kind)
    script = os.path.join(ROOT, "export.py")
    r = subprocess.run([PYTHON, script, str(sources / "tiny.gguf"), str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-800:]
    assert untouched() and out.stat().st_size > 1000 and not glob.glob(str(out) + ".tmp.*")


def test_output_beside_the_input_is_fine(sources, tmp_path):
    """The check compares files, not directories: DIR/model.bin next to DIR's checkpoint exports."""
    work = tmp_path / "copy"
    shutil.copytree(sources / "hf", work)
    script = os.path.join(ROOT, "export.py")
    r = subprocess.run([PYTHON, script, str(work), str(work / "model.bin")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(work / "model.bin") > 0


# ----------------------------------------------------------------------------
# Signals

def zero_checkpoint(d, vocab, dim):
    """An HF Llama directory with one layer and tied embeddings, every weight zero, written as a
    sparse file (no disk blocks): vocab x dim embedding values for export.py to convert."""
    os.makedirs(d)
    cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=dim, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
               max_position_embeddings=128, tie_word_embeddings=True)
    json.dump(cfg, open(d / "config.json", "w"))
    p = "model.layers.0."
    shapes = {"model.embed_tokens.weight": [vocab, dim], "model.norm.weight": [dim],
              p + "input_layernorm.weight": [dim], p + "post_attention_layernorm.weight": [dim],
              p + "mlp.gate_proj.weight": [64, dim], p + "mlp.up_proj.weight": [64, dim],
              p + "mlp.down_proj.weight": [dim, 64]}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[p + "self_attn." + name + ".weight"] = [dim, dim]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * (shape[1] if len(shape) == 2 else 1)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return d


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_removes_partial_output(tmp_path, sig):
    """A signal while OUT.tmp is being written (a 134M-value export at q8_0, ~4 s here): exit
    non-zero with one error line, and neither OUT.tmp nor OUT is left. SIGTERM used to kill
    export.py with OUT.tmp left behind; SIGINT printed a KeyboardInterrupt traceback."""
    source = zero_checkpoint(tmp_path / "big", vocab=131072, dim=1024)
    out = tmp_path / "out.bin"
    script = os.path.join(ROOT, "export.py")
    p = subprocess.Popen([PYTHON, script, str(source), str(out), "--dtype", "q8_0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, written = time.time(), 0
    while p.poll() is None and time.time() - start < 60:
        tmps = glob.glob(str(out) + ".tmp.*")
        written = os.path.getsize(tmps[0]) if tmps else 0
        if written > 4 << 20:  # past the header and tables: tensor data is being written
            break
        time.sleep(0.02)
    assert p.poll() is None, f"export.py ended before the signal (exit {p.returncode})"
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=60)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    print(f"\n[{sig.name}] sent {time.time() - start:.2f} s after start, {written >> 20} MB of "
          f"OUT.tmp written; exit {p.returncode}: {errors}")
    assert p.returncode != 0
    assert len(errors) == 1 and sig.name in errors[0] and "Traceback" not in stderr, stderr
    assert not glob.glob(str(out) + ".tmp*"), "the temporary is left behind"
    assert not os.path.exists(out)
