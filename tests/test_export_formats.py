"""export.py's input paths that the HF safetensors models of test_engine.py do not reach: GGUF
tensors in each storage type llama.cpp models ship (K-quants Q2_K..Q6_K, Q4_0, Q8_0, F16, BF16),
a sharded safetensors checkpoint, and --tokenizer-only.

GGUF reference: HF transformers loading the same GGUF file (from_pretrained(gguf_file=...)), which
dequantizes each tensor with the gguf package and undoes llama.cpp's q/k row order by its own code;
the engine runs export.py's f32 export, so the two compute on the same weights and agree to f32
rounding. gguf.quants.quantize cannot encode K-quants, so those GGUFs hold random valid blocks.
Tokenizer reference: HF tokenizers on the tokenizer the file was made from.
"""
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import PYTHON, ROOT, engine_logits, export, run, tiny_llama

# A Llama whose matrices all have 256 columns: K-quant blocks hold 256 values of one row.
GGUF_SHAPE = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.05)
HEAD_DIM = 64
# max |engine - HF| / max |HF|. Measured 1.3e-6 (Q4_0, Q8_0, F16, BF16) to 5.7e-6 (Q4_K): the
# random K-quant models amplify float32 rounding more (HF float32 itself is 3.2e-6 from HF float64
# on the Q4_K one), so twice test_engine.py's f32 bound.
F32_BOUND = 2e-5
IDS = [int(i) for i in np.random.default_rng(1).integers(0, 256, 120)]

# Types gguf.quants.quantize can encode; for the K-quants it has only a dequantizer, so their
# blocks are made here: random bytes, with each block's f16 scale fields (d, and dmin where the
# type has one; byte offsets as in ggml's block_q*_K structs) set to give weights of the HF
# model's magnitude.
QUANTIZABLE = ["Q4_0", "Q8_0", "F16", "BF16"]
# per K-quant type: byte offsets of d, and of dmin where the type has one; the types with a dmin
# store unsigned codes q in [0, levels) and a value d * scale * q - dmin * min, so dmin = d times
# the mean code (levels - 1) / 2 centres the values on 0 as trained weights are
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
K_MEAN_CODE = {"Q2_K": 1.5, "Q4_K": 7.5, "Q5_K": 15.5}


def tiny_hf_model():
    """The random-init HF Llama the GGUFs start from, norms randomised so a lost norm shows."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**GGUF_SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def llama_cpp_row_order(w, n_head):
    """HF's q/k rows (rotate-half: per head, the first half of the rotary pairs, then the
    second) in llama.cpp's order, where the two rows of a pair are adjacent: HF row
    h * H + half * H/2 + j becomes GGUF row h * H + 2 j + half."""
    return w.reshape(n_head, 2, HEAD_DIM // 2, -1).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(qtype, rows, cols, target_rms, rng):
    """Random but valid K-quant data of a rows x cols matrix, its values' RMS about target_rms,
    their mean about 0."""
    import gguf
    t = gguf.GGMLQuantizationType[qtype]
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)

    def set_scales(d):  # d: (rows, blocks) float16; dmin follows it
        for at, times in zip(K_SCALE_OFFSETS[qtype], (1, K_MEAN_CODE.get(qtype))):
            raw[:, :, at:at + 2] = (d * np.float16(times)).view(np.uint8).reshape(rows, -1, 2)

    set_scales(np.ones(raw.shape[:2], np.float16))
    rms = np.sqrt(np.mean(gguf.quants.dequantize(raw.reshape(rows, -1), t) ** 2))
    # values are linear in d and dmin: scale both, with some spread between blocks
    set_scales((target_rms / rms * rng.uniform(0.5, 1.5, raw.shape[:2])).astype(np.float16))
    return raw.reshape(rows, -1)


def write_gguf(path, qtype):
    """A llama GGUF of tiny_hf_model() as llama.cpp lays one out, every matrix stored as qtype
    (the K-quants: random blocks of the same magnitude instead), vectors as F32."""
    import gguf
    t = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(2)
    sd = {k: v.numpy().astype(np.float32) for k, v in tiny_hf_model().state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(GGUF_SHAPE["num_hidden_layers"])
    w.add_context_length(GGUF_SHAPE["max_position_embeddings"])
    w.add_embedding_length(GGUF_SHAPE["hidden_size"])
    w.add_feed_forward_length(GGUF_SHAPE["intermediate_size"])
    w.add_head_count(GGUF_SHAPE["num_attention_heads"])
    w.add_head_count_kv(GGUF_SHAPE["num_key_value_heads"])
    w.add_layer_norm_rms_eps(GGUF_SHAPE["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(GGUF_SHAPE["vocab_size"])

    def add(name, x):
        if x.ndim == 1:
            w.add_tensor(name, x)
        elif qtype in QUANTIZABLE:
            w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)
        else:
            blocks = k_quant_blocks(qtype, *x.shape, np.sqrt(np.mean(x ** 2)), rng)
            w.add_tensor(name, blocks, raw_dtype=t)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    heads = {"q_proj": GGUF_SHAPE["num_attention_heads"],
             "k_proj": GGUF_SHAPE["num_key_value_heads"]}
    for i in range(GGUF_SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for ours, theirs in [("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"),
                             ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                             ("attn_output", "self_attn.o_proj"),
                             ("ffn_norm", "post_attention_layernorm"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                             ("ffn_down", "mlp.down_proj")]:
            x = sd[p + theirs + ".weight"]
            role = theirs.split(".")[-1]
            if role in heads:
                x = llama_cpp_row_order(x, heads[role])
            add(f"blk.{i}.{ours}.weight", x)
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", [*K_SCALE_OFFSETS, *QUANTIZABLE])
def test_gguf_tensor_type_matches_hf(tmp_path, qtype):
    """A GGUF whose matrices are all qtype, exported at f32: the engine's logits equal HF's on
    the same GGUF."""
    import gguf
    from transformers import AutoModelForCausalLM
    source = write_gguf(tmp_path / "tiny.gguf", qtype)
    stored = {t.tensor_type.name for t in gguf.GGUFReader(str(source)).tensors if len(t.shape) == 2}
    assert stored == {qtype}, f"the GGUF stores {stored}"
    got = engine_logits(export(source, tmp_path / "tiny.bin", "f32"), IDS, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                              dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = hf.eval()(torch.tensor([IDS])).logits[0].numpy()
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"\n[gguf {qtype}] relative max err {err:.3g} (bound {F32_BOUND}), {len(IDS)} positions")
    assert err <= F32_BOUND


def test_sharded_safetensors_give_the_same_file(tmp_path):
    """A checkpoint saved in shards (model.safetensors.index.json + 5 files) exports to the very
    bytes of the same checkpoint saved whole."""
    from transformers import LlamaForCausalLM
    whole = tiny_llama(tmp_path / "whole")
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(whole).save_pretrained(sharded, max_shard_size="100KB")
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(shards) >= 3 and os.path.exists(sharded / "model.safetensors.index.json")
    for dtype in ("f32", "q8_0"):
        a = open(export(whole, tmp_path / f"whole_{dtype}.bin", dtype), "rb").read()
        b = open(export(sharded, tmp_path / f"sharded_{dtype}.bin", dtype), "rb").read()
        print(f"\n[sharded {dtype}] {len(shards)} shards -> {len(b)} bytes, identical: {a == b}")
        assert a == b


TEXT = "Hello, world! It's 2024: 3.14159 x  42 apples.\n\tdef f(x): return x**2 # ok 👍🏽 é"
CORPUS = ("the quick brown fox jumps over the lazy dog; it's 12 o'clock and 3.5 apples cost "
          "42 cents. def main(argv): return len(argv) ** 2  # a comment\n") * 20


def trained_tokenizer():
    """A GPT-2 style byte-level BPE (HF tokenizers), 400 tokens trained on a small corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return tok


def tokenizer_gguf(path, tok):
    """A GGUF holding only tokenizer.ggml.* metadata for tok, as llama.cpp writes a GPT-2 BPE."""
    import json

    import gguf
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    specials = {a["content"] for a in json.loads(tok.to_str())["added_tokens"]}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_eos_token_id(model["vocab"]["<|endoftext|>"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tokenizer_only_cli(tmp_path):
    """export.py SOURCE OUT --tokenizer-only, from a tokenizer.json and from a GGUF's tokenizer
    metadata: ./run OUT -m tokenize gives HF tokenizers' ids for a mixed text."""
    tok = trained_tokenizer()
    want = tok.encode(TEXT, add_special_tokens=False).ids
    hf_dir = tmp_path / "hf"
    os.makedirs(hf_dir)
    tok.save(str(hf_dir / "tokenizer.json"))
    sources = {"tokenizer.json": hf_dir, "gguf": tokenizer_gguf(tmp_path / "tok.gguf", tok)}
    for name, source in sources.items():
        out = tmp_path / f"tok_{name}.bin"
        script = os.path.join(ROOT, "export.py")
        r = subprocess.run([PYTHON, script, str(source), str(out), "--tokenizer-only"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert f"tokenizer: {tok.get_vocab_size()} tokens" in r.stdout, r.stdout
        got = [int(x) for x in run(out, "-m", "tokenize", "-i", TEXT).stdout.split()]
        print(f"\n[--tokenizer-only from {name}] {os.path.getsize(out)} bytes; {len(got)} ids, "
              f"HF {len(want)}, equal: {got == want}")
        assert got == want
