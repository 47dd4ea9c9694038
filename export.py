"""export.py - write a longrun model file from a Hugging Face checkpoint or a GGUF file.

    python export.py SOURCE OUT [--dtype f32|f16|bf16|q8_0]

SOURCE is a Hugging Face model directory (config.json + model.safetensors, or a sharded
checkpoint with model.safetensors.index.json) or a llama-architecture .gguf file.

The output is the little-endian file that model.h defines and run.c mmaps:

    offset 0              FileHeader (128 bytes): dimensions, flags, section offsets, arch
    128                   LayerConfig[n_layers] (64 bytes each): attention kind, window, RoPE
    tensor_table_offset   TensorEntry[n_tensors] (80 bytes each): name, dtype, shape, offset, size
    tokenizer_offset      tokenizer section (none yet: offset = size = 0)
    ...                   tensor data, each tensor starting on a 64-byte boundary

Weights keep the Hugging Face layout (rows = out features, rotate-half q/k order), so HF
tensors are copied as they are; GGUF q/k rows are un-permuted back to that order.
Vectors (norms, biases, RoPE factor lists) are always f32; matrices take --dtype.
Only numpy and the standard library are needed, plus the `gguf` package for GGUF input.
"""
import argparse
import json
import math
import os
import struct
import sys
from functools import partial

import numpy as np

# ----------------------------------------------------------------------------
# The file format: a mirror of model.h, field by field

LR_MAGIC = 0x4E52474C  # "LGRN"
LR_VERSION = 1
LR_ALIGN = 64
LR_Q8_BLOCK = 32
LR_NAME_LEN = 40

DTYPES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3}
ROPE_TYPES = {"default": 0, "linear": 1, "dynamic": 2, "yarn": 3, "llama3": 4, "longrope": 5}
ATTN_FULL, ATTN_SLIDING = 0, 1

# (name, struct code) in the order of the C struct; "<" = little-endian, no padding.
HEADER_FIELDS = [
    ("magic", "I"), ("version", "I"), ("header_size", "I"), ("n_layers", "I"),
    ("dim", "I"), ("hidden_dim", "I"), ("n_heads", "I"), ("n_kv_heads", "I"),
    ("head_dim", "I"), ("vocab_size", "I"), ("max_seq_len", "I"), ("norm_eps", "f"),
    ("tied_embeddings", "I"), ("qkv_bias", "I"), ("qk_norm", "I"), ("n_tensors", "I"),
    ("tensor_table_offset", "Q"), ("tokenizer_offset", "Q"), ("tokenizer_size", "Q"),
    ("file_size", "Q"), ("arch", "32s"),
]
LAYER_FIELDS = [
    ("attn_kind", "I"), ("window", "I"), ("rope_type", "I"), ("rotary_dim", "I"),
    ("rope_theta", "f"), ("factor", "f"), ("orig_ctx", "I"), ("attention_factor", "f"),
    ("beta_fast", "f"), ("beta_slow", "f"), ("mscale", "f"), ("mscale_all_dim", "f"),
    ("low_freq_factor", "f"), ("high_freq_factor", "f"), ("yarn_truncate", "I"), ("reserved", "I"),
]
TENSOR_FIELDS = [
    ("name", f"{LR_NAME_LEN}s"), ("dtype", "I"), ("n_dims", "I"), ("rows", "Q"), ("cols", "Q"),
    ("offset", "Q"), ("size", "Q"),
]


def make_struct(fields, size):
    s = struct.Struct("<" + "".join(code for _, code in fields))
    assert s.size == size, f"struct is {s.size} bytes, model.h says {size}"
    return s


HEADER = make_struct(HEADER_FIELDS, 128)
LAYER = make_struct(LAYER_FIELDS, 64)
TENSOR = make_struct(TENSOR_FIELDS, 80)


def pack(s, fields, values):
    """Pack a dict of field values; fields not given are 0, strings are NUL padded."""
    out = []
    for name, code in fields:
        v = values.get(name, 0)
        out.append(v.encode() if code.endswith("s") else v)
    return s.pack(*out)


# Our tensor names (model.h) and their names in the sources: (Hugging Face, GGUF). Layer
# tensors are "blk.N.<role>" here, "model.layers.N.<hf>" in HF and "blk.N.<gguf>" in GGUF.
HF, GGUF = 0, 1
SOURCE_NAMES = {
    "tok_embd": ("model.embed_tokens.weight", "token_embd.weight"),
    "output_norm": ("model.norm.weight", "output_norm.weight"),
    "output": ("lm_head.weight", "output.weight"),
    "attn_norm": ("input_layernorm.weight", "attn_norm.weight"),
    "wq": ("self_attn.q_proj.weight", "attn_q.weight"),
    "wk": ("self_attn.k_proj.weight", "attn_k.weight"),
    "wv": ("self_attn.v_proj.weight", "attn_v.weight"),
    "wo": ("self_attn.o_proj.weight", "attn_output.weight"),
    "bq": ("self_attn.q_proj.bias", None),
    "bk": ("self_attn.k_proj.bias", None),
    "bv": ("self_attn.v_proj.bias", None),
    "q_norm": ("self_attn.q_norm.weight", None),
    "k_norm": ("self_attn.k_norm.weight", None),
    "ffn_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "w_gate": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "w_up": ("mlp.up_proj.weight", "ffn_up.weight"),
    "w_down": ("mlp.down_proj.weight", "ffn_down.weight"),
}


def source_name(name, source):
    if not name.startswith("blk."):
        return SOURCE_NAMES[name][source]
    _, layer, role = name.split(".")
    return f"{'model.layers' if source == HF else 'blk'}.{layer}.{SOURCE_NAMES[role][source]}"


class ExportError(Exception):
    """A problem with the input; main() prints it as one `error:` line."""


def align(n):
    return (n + LR_ALIGN - 1) // LR_ALIGN * LR_ALIGN


# ----------------------------------------------------------------------------
# Encoding a float32 array in each dtype

def to_bf16(x):
    """float32 -> bfloat16 bits, round to nearest even (what torch's .to(bfloat16) does)."""
    bits = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # adding 0x7FFF+lsb rounds half to even
    return np.where(np.isnan(x), 0x7FC0, rounded).astype("<u2")  # keep NaN a NaN, not inf


def quantize_q8_0(x):
    """Per row, blocks of 32: d = max|x|/127, q = round(x/d). Returns (int8 quants, f32 scales)."""
    blocks = x.reshape(x.shape[0], -1, LR_Q8_BLOCK)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    q = np.divide(blocks, d, out=np.zeros_like(blocks), where=d > 0)  # an all-zero block keeps q = 0
    q = np.clip(np.round(q), -127, 127).astype(np.int8)
    return q.reshape(x.shape), d.reshape(-1).astype("<f4")


def encoded_size(dtype, rows, cols):
    n = rows * cols
    return {"f32": 4 * n, "f16": 2 * n, "bf16": 2 * n, "q8_0": n + 4 * (n // LR_Q8_BLOCK)}[dtype]


def convert(x, dtype, name):
    """f32 / f16 / bf16 values of x, as the little-endian array to write."""
    if dtype == "f16":
        big = float(np.abs(x).max(initial=0))
        if big > 65504:  # float16's largest finite value; beyond it the weight would become inf
            raise ExportError(f"{name} has |value| {big:g}, beyond float16 range; use --dtype bf16 or f32")
        return x.astype("<f2")
    return to_bf16(x) if dtype == "bf16" else x.astype("<f4")


def encode(x, dtype, name):
    """Yield a tensor's bytes in file order as arrays, ~1M values at a time so the
    temporaries of conversion stay small; q8_0 writes all quants, then all scales."""
    step = max(1, (1 << 20) // (x.shape[1] if x.ndim == 2 else 1))
    scales = []
    for r in range(0, x.shape[0], step):
        if dtype == "q8_0":
            q, d = quantize_q8_0(x[r:r + step])
            scales.append(d)
            yield q
        else:
            yield convert(x[r:r + step], dtype, name)
    if scales:
        yield np.concatenate(scales)


# ----------------------------------------------------------------------------
# Hugging Face checkpoints: safetensors, config.json and the RoPE / window rules

ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # bf16 is read as raw 16-bit words
class Safetensors:
    """The tensors of a (possibly sharded) safetensors checkpoint, looked up by our names and
    read lazily through np.memmap. Each file is: u64 little-endian header length n, n bytes of
    JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the data (offsets count from
    its start)."""

    def __init__(self, model_dir):
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(model_dir, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise ExportError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                              "(PyTorch .bin checkpoints are not supported)")
        self.entries = {}  # HF name -> (path, absolute byte offset, dtype, shape)
        for file in files:
            path = os.path.join(model_dir, file)
            with open(path, "rb") as f:
                try:
                    (n,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n))
                except (struct.error, ValueError):
                    raise ExportError(f"{path}: not a safetensors file (bad header)") from None
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = info["data_offsets"]
                    dtype, shape = info["dtype"], tuple(info["shape"])
                    if dtype in ST_DTYPES and end - begin != math.prod(shape) * np.dtype(ST_DTYPES[dtype]).itemsize:
                        raise ExportError(f"{path}: {name} has {end - begin} bytes, its shape needs another size")
                    self.entries[name] = (path, 8 + n + begin, dtype, shape)

    def describe(self, name):
        return source_name(name, HF)

    def shape(self, name):
        """Shape of a tensor we are going to read (None if absent), checking its dtype."""
        entry = self.entries.get(self.describe(name))
        if entry and entry[2] not in ST_DTYPES:
            raise ExportError(f"{self.describe(name)}: dtype {entry[2]} is not supported (F32, F16, BF16 are)")
        return entry and entry[3]

    def load(self, name):
        path, offset, dtype, shape = self.entries[self.describe(name)]
        raw = np.memmap(path, dtype=ST_DTYPES[dtype], mode="r", offset=offset, shape=(math.prod(shape),))
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            bits = raw.astype(np.uint32)
            bits <<= 16
            return bits.view(np.float32).reshape(shape)
        return raw.astype(np.float32, copy=False).reshape(shape)  # F32 stays a view of the file


# Per architecture: our arch name, and transformers 5.23's config-class defaults for the keys
# export.py reads, used when config.json leaves one out (so we build the model HF would build).
COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
                   "num_key_value_heads": None, "head_dim": None, "rope_theta": 10000.0}
QWEN_DEFAULTS = {"num_key_value_heads": 32, "max_position_embeddings": 32768,
                 "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
ARCHS = {
    "LlamaForCausalLM": ("llama", {"max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False}),
    "MistralForCausalLM": ("mistral", {"num_key_value_heads": 8, "max_position_embeddings": 131072,
                                       "sliding_window": 4096}),
    "Qwen2ForCausalLM": ("qwen2", QWEN_DEFAULTS),
    "Qwen3ForCausalLM": ("qwen3", {**QWEN_DEFAULTS, "head_dim": 128, "attention_bias": False}),
}


def hf_rope(cfg, head_dim):
    """LayerConfig RoPE fields (+ longrope factor tensors) from v4 `rope_scaling` + `rope_theta`
    or v5 `rope_parameters`, following transformers' standardize_rope_params (spec §2.2)."""
    rp = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})  # HF: rope_scaling wins
    if rp and set(rp) <= set(cfg.get("layer_types") or ()):
        raise ExportError("per-layer-type rope_parameters are not supported for this architecture")
    kind = rp.get("rope_type", rp.get("type", "default"))
    kind = "longrope" if kind == "su" else kind  # "su": Phi-3's early name for LongRoPE
    if kind not in ROPE_TYPES:
        raise ExportError(f"RoPE type '{kind}' is not supported (known: {', '.join(ROPE_TYPES)})")
    theta = rp.get("rope_theta") or cfg["rope_theta"] or 10000.0  # the dict's value wins, as in HF
    prf = rp.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0
    if prf != 1.0:  # HF's rotary code for these classes rotates the whole head, whatever prf says
        raise ExportError(f"partial_rotary_factor {prf} is not supported for {cfg['architectures'][0]}")
    rotary_dim = int(head_dim * prf)
    if rotary_dim % 2:
        raise ExportError(f"rotary dimension {rotary_dim} (head_dim {head_dim} x {prf}) is odd")
    rope = {"rope_type": ROPE_TYPES[kind], "rotary_dim": rotary_dim, "rope_theta": theta}

    def need(key):
        if rp.get(key) is None:
            raise ExportError(f"RoPE type '{kind}' needs '{key}' in the rope config")
        return rp[key]

    max_pos = cfg["max_position_embeddings"]
    orig = cfg.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings") or max_pos
    if kind in ("linear", "dynamic", "llama3"):
        rope["factor"] = need("factor")
    if kind in ("yarn", "llama3", "longrope"):
        rope["orig_ctx"] = orig  # Phi-3 keeps it top-level, and that copy takes priority
    if kind in ("yarn", "longrope"):
        rope["factor"] = rp.get("factor") or max_pos / orig  # v5: explicit factor, else M / L0
        rope["attention_factor"] = rp.get("attention_factor") or 0.0  # 0: run.c derives it
    if kind == "yarn":  # HF reads these with `or`, so 0 / null mean the default
        rope.update(beta_fast=rp.get("beta_fast") or 32.0, beta_slow=rp.get("beta_slow") or 1.0,
                    mscale=rp.get("mscale") or 0.0, mscale_all_dim=rp.get("mscale_all_dim") or 0.0,
                    yarn_truncate=int(bool(rp.get("truncate", True))))
    if kind == "llama3":
        rope.update(low_freq_factor=need("low_freq_factor"), high_freq_factor=need("high_freq_factor"))
    factors = {}
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            values = np.asarray(need(key), dtype=np.float32)
            if values.shape != (rotary_dim // 2,):
                raise ExportError(f"longrope {key} has {values.size} values, rotary_dim/2 = {rotary_dim // 2}")
            factors["rope." + key] = values
    return rope, factors


def hf_windows(cfg, arch, n_layers):
    """Per-layer (attn_kind, window) as transformers builds the masks (spec §9.2)."""
    full = [(ATTN_FULL, 0)] * n_layers
    if arch == "mistral":  # every layer slides when sliding_window is set; layer_types is ignored
        w = cfg["sliding_window"]
        return [(ATTN_SLIDING, w)] * n_layers if w else full
    if arch in ("qwen2", "qwen3"):  # Qwen2Config.__post_init__: no window unless use_sliding_window
        w = cfg["sliding_window"] if cfg["use_sliding_window"] else None
        types = cfg.get("layer_types") or [
            "sliding_attention" if w is not None and i >= cfg["max_window_layers"] else "full_attention"
            for i in range(n_layers)]
        if len(types) != n_layers or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ExportError(f"layer_types must list {n_layers} of full_attention/sliding_attention")
        if "sliding_attention" in types and not w:
            raise ExportError("layer_types has sliding layers but no sliding window is set "
                              "(use_sliding_window / sliding_window)")
        return [(ATTN_SLIDING, w) if t == "sliding_attention" else (ATTN_FULL, 0) for t in types]
    return full


def read_hf(model_dir):
    """Header fields, per-layer configs, extra tensors and a tensor source for an HF directory."""
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    name = (raw.get("architectures") or ["(none)"])[0]
    if name not in ARCHS:
        raise ExportError(f"architecture {name} is not supported (supported: {', '.join(ARCHS)})")
    arch, defaults = ARCHS[name]
    cfg = {**COMMON_DEFAULTS, **defaults, **raw}  # as in HF, a key given as null overrides the default
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ExportError(f"config.json has no '{key}'")
    if cfg["hidden_act"] != "silu":
        raise ExportError(f"hidden_act '{cfg['hidden_act']}' is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise ExportError("mlp_bias: true is not supported (the model file has no MLP biases)")
    if cfg.get("attention_bias"):  # in HF this also gives o_proj a bias, which model.h has no slot for
        raise ExportError("attention_bias: true is not supported (o_proj bias has no place in the model file)")
    heads = cfg["num_attention_heads"]
    header = {"arch": arch, "n_layers": cfg["num_hidden_layers"], "dim": cfg["hidden_size"],
              "hidden_dim": cfg["intermediate_size"], "n_heads": heads,
              "n_kv_heads": cfg["num_key_value_heads"] or heads,
              "head_dim": cfg["head_dim"] or cfg["hidden_size"] // heads,
              "vocab_size": cfg["vocab_size"], "max_seq_len": cfg["max_position_embeddings"],
              "norm_eps": cfg["rms_norm_eps"], "tied_embeddings": int(bool(cfg["tie_word_embeddings"])),
              "qkv_bias": int(arch == "qwen2"), "qk_norm": int(arch == "qwen3")}
    rope, factors = hf_rope(cfg, header["head_dim"])
    layers = [{**rope, "attn_kind": kind, "window": w} for kind, w in hf_windows(cfg, arch, header["n_layers"])]
    return header, layers, factors, Safetensors(model_dir)


# ----------------------------------------------------------------------------
# GGUF files (llama architecture), dequantized with the gguf package

def unpermute_rows(w, n_head):
    """llama.cpp stores q/k rows in Meta's interleaved-pair order; HF (rotate-half) row
    h*(H/2) + j is Meta row 2j + h within each head (spec §3.3)."""
    out, cols = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


class GgufSource:
    """Our tensor names -> dequantized GGUF tensors in HF layout, as float32."""

    def __init__(self, reader, dequantize, n_heads, n_kv_heads):
        self.tensors = {t.name: t for t in reader.tensors}
        self.dequantize = dequantize
        self.heads = {"wq": n_heads, "wk": n_kv_heads}

    def describe(self, name):
        return source_name(name, GGUF)

    def shape(self, name):
        t = self.tensors.get(self.describe(name))
        return None if t is None else tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 = cols first

    def load(self, name):
        t = self.tensors[self.describe(name)]
        try:
            w = self.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(self.shape(name))
        except NotImplementedError:
            raise ExportError(f"{t.name}: GGUF type {t.tensor_type.name} cannot be dequantized by gguf") from None
        role = name.split(".")[-1]
        return unpermute_rows(w, self.heads[role]) if name.startswith("blk.") and role in self.heads else w


def read_gguf(path):
    """Header fields, per-layer configs and a tensor source for a llama-architecture GGUF file."""
    try:
        import gguf  # imported here so that HF exports need only numpy
    except ImportError:
        raise ExportError("reading GGUF needs the gguf package: pip install gguf") from None
    reader = gguf.GGUFReader(path)

    def meta(key, default=None):  # no default: the key is required
        field = reader.fields.get(key)
        if field is None and default is None:
            raise ExportError(f"{path}: GGUF metadata has no '{key}'")
        return default if field is None else field.contents()

    if meta("general.architecture") != "llama":
        raise ExportError(f"GGUF architecture '{meta('general.architecture')}' is not supported (only llama)")
    if meta("llama.expert_count", 0):
        raise ExportError("mixture-of-experts GGUF models are not supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ExportError("rope_freqs tensor (llama3 scaling) not supported yet")
    if any(n.endswith(".bias") for n in names):
        raise ExportError("GGUF bias tensors are not supported")
    dim, heads = meta("llama.embedding_length"), meta("llama.attention.head_count")
    head_dim = meta("llama.attention.key_length", dim // heads)
    if meta("llama.attention.value_length", head_dim) != head_dim:
        raise ExportError("GGUF key_length and value_length differ")
    vocab = meta("llama.vocab_size", 0) or len(meta("tokenizer.ggml.tokens", []))
    if not vocab:
        raise ExportError(f"{path}: GGUF has neither llama.vocab_size nor tokenizer.ggml.tokens")
    if meta("llama.rope.dimension_count", head_dim) != head_dim:  # q/k un-permutation assumes full rotary
        raise ExportError("partial rotary (rope.dimension_count != head_dim) is not supported for GGUF")
    header = {"arch": "llama", "n_layers": meta("llama.block_count"), "dim": dim,
              "hidden_dim": meta("llama.feed_forward_length"), "n_heads": heads,
              "n_kv_heads": meta("llama.attention.head_count_kv", heads), "head_dim": head_dim,
              "vocab_size": vocab, "max_seq_len": meta("llama.context_length"),
              "norm_eps": meta("llama.attention.layer_norm_rms_epsilon"),
              "tied_embeddings": int("output.weight" not in names), "qkv_bias": 0, "qk_norm": 0}
    rope = gguf_rope(meta, head_dim, header["max_seq_len"])
    layers = [{**rope, "attn_kind": ATTN_FULL, "window": 0} for _ in range(header["n_layers"])]
    return header, layers, {}, GgufSource(reader, gguf.quants.dequantize, heads, header["n_kv_heads"])


def gguf_rope(meta, head_dim, max_seq_len):
    """LayerConfig RoPE fields from llama.cpp's rope keys (spec §6.7); llama.cpp's YaRN uses
    HF's defaults (beta 32/1, floor/ceil range, attention factor 0.1 ln s + 1)."""
    rope = {"rope_type": ROPE_TYPES["default"], "rotary_dim": head_dim,
            "rope_theta": meta("llama.rope.freq_base", 10000.0)}
    kind = meta("llama.rope.scaling.type", "none")
    factor = meta("llama.rope.scaling.factor", 0.0) or meta("llama.rope.scale_linear", 0.0)  # older key
    if kind == "linear" or (kind == "none" and factor not in (0.0, 1.0)):
        rope.update(rope_type=ROPE_TYPES["linear"], factor=factor)
    elif kind == "yarn":
        if meta("llama.rope.scaling.attn_factor", 1.0) != 1.0:  # its meaning changed across llama.cpp versions
            raise ExportError("GGUF yarn rope.scaling.attn_factor != 1 is not supported")
        rope.update(rope_type=ROPE_TYPES["yarn"], factor=factor, beta_fast=32.0, beta_slow=1.0, yarn_truncate=1,
                    orig_ctx=meta("llama.rope.scaling.original_context_length", max_seq_len))
    elif kind != "none":
        raise ExportError(f"GGUF rope scaling '{kind}' is not supported (none, linear, yarn are)")
    return rope


# ----------------------------------------------------------------------------
# Writing the model file

def expected_tensors(h):
    """(name, shape) of every tensor the header implies, in file order (model.h's list)."""
    D, F, V, H = h["dim"], h["hidden_dim"], h["vocab_size"], h["head_dim"]
    Q, K = h["n_heads"] * H, h["n_kv_heads"] * H
    yield "tok_embd", (V, D)
    for i in range(h["n_layers"]):
        b = f"blk.{i}."
        yield from [(b + "attn_norm", (D,)), (b + "wq", (Q, D)), (b + "wk", (K, D)), (b + "wv", (K, D)),
                    (b + "wo", (D, Q))]
        if h["qkv_bias"]:
            yield from [(b + "bq", (Q,)), (b + "bk", (K,)), (b + "bv", (K,))]
        if h["qk_norm"]:
            yield from [(b + "q_norm", (H,)), (b + "k_norm", (H,))]
        yield from [(b + "ffn_norm", (D,)), (b + "w_gate", (F, D)), (b + "w_up", (F, D)), (b + "w_down", (D, F))]
    yield "output_norm", (D,)
    if not h["tied_embeddings"]:
        yield "output", (V, D)


def check_config(h):
    for key in ("n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "max_seq_len"):
        if not isinstance(h[key], int) or h[key] <= 0:
            raise ExportError(f"{key} = {h[key]!r} must be a positive integer")
    if h["n_heads"] % h["n_kv_heads"]:
        raise ExportError(f"n_heads {h['n_heads']} is not a multiple of n_kv_heads {h['n_kv_heads']}")


def plan_tensors(h, factors, source, dtype):
    """Check every tensor is present with the right shape, before a byte is written, and
    choose each one's dtype. Returns [(name, shape, dtype, load)]."""
    plan = []
    for name, shape in expected_tensors(h):
        got = source.shape(name)
        if got is None:
            raise ExportError(f"missing tensor {source.describe(name)}")
        if tuple(got) != shape:
            raise ExportError(f"tensor {source.describe(name)} has shape {list(got)}, expected {list(shape)}")
        plan.append((name, shape, partial(source.load, name)))
    plan += [(name, v.shape, lambda v=v: v) for name, v in factors.items()]
    out, unblockable = [], []
    for name, shape, load in plan:
        t = "f32" if len(shape) == 1 else dtype  # vectors are tiny and precision-critical
        if t == "q8_0" and shape[1] % LR_Q8_BLOCK:  # q8_0 blocks must not straddle rows
            t = "f32"
            unblockable.append(name)
        out.append((name, shape, t, load))
    if unblockable:
        print(f"note: {len(unblockable)} matrices have a column count that is not a multiple of "
              f"{LR_Q8_BLOCK}, stored as f32 instead of q8_0: {', '.join(unblockable[:4])}"
              + (", ..." if len(unblockable) > 4 else ""))
    return out


def write_model(path, header, layers, plan):
    """Header, layer table and tensor table first (all sizes are known up front), then each
    tensor loaded, encoded and written one at a time so memory stays at about one tensor."""
    table_offset = HEADER.size + LAYER.size * len(layers)
    offset = align(table_offset + TENSOR.size * len(plan))
    entries = []
    for name, shape, dtype, _ in plan:
        rows, cols = shape if len(shape) == 2 else (shape[0], 1)
        if len(name.encode()) >= LR_NAME_LEN:
            raise ExportError(f"tensor name {name} is longer than {LR_NAME_LEN - 1} bytes")
        size = encoded_size(dtype, rows, cols)
        entries.append({"name": name, "dtype": DTYPES[dtype], "n_dims": len(shape), "rows": rows,
                        "cols": cols, "offset": offset, "size": size})
        offset = align(offset + size)
    file_size = entries[-1]["offset"] + entries[-1]["size"]
    header = {**header, "magic": LR_MAGIC, "version": LR_VERSION, "header_size": HEADER.size,
              "n_layers": len(layers), "n_tensors": len(plan), "tensor_table_offset": table_offset,
              "tokenizer_offset": 0, "tokenizer_size": 0, "file_size": file_size}

    tmp = path + ".tmp"  # written in full, then renamed: an error never leaves a partial OUT
    try:
        with open(tmp, "wb") as f:
            f.write(pack(HEADER, HEADER_FIELDS, header))
            for layer in layers:
                f.write(pack(LAYER, LAYER_FIELDS, layer))
            for e in entries:
                f.write(pack(TENSOR, TENSOR_FIELDS, e))
            for e, (name, shape, dtype, load) in zip(entries, plan):
                f.write(b"\0" * (e["offset"] - f.tell()))
                for part in encode(np.asarray(load(), dtype=np.float32).reshape(shape), dtype, name):
                    f.write(np.ascontiguousarray(part).data)
                assert f.tell() == e["offset"] + e["size"], f"{name}: wrote the wrong number of bytes"
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return file_size


def main():
    ap = argparse.ArgumentParser(
        description="Export a Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3; safetensors) "
                    "or a llama-architecture GGUF file to a longrun model file.",
        epilog="example: python export.py ./SmolLM2-135M-Instruct model.bin --dtype q8_0")
    ap.add_argument("source", help="HF model directory (config.json + *.safetensors) or a .gguf file")
    ap.add_argument("out", help="output model file (written as OUT.tmp, then renamed)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="q8_0",
                    help="storage type of the weight matrices (default: q8_0, int8 with one f32 scale "
                         "per 32 values, ~4x smaller than f32; f32 is the exact reference). Norms and "
                         "biases are always f32.")
    args = ap.parse_args()
    try:
        if os.path.isdir(args.source):
            header, layers, factors, source = read_hf(args.source)
        elif os.path.isfile(args.source):
            header, layers, factors, source = read_gguf(args.source)
        else:
            raise ExportError(f"{args.source}: no such file or directory")
        check_config(header)
        plan = plan_tensors(header, factors, source, args.dtype)
        size = write_model(args.out, header, layers, plan)
    except (ExportError, OSError) as e:  # OSError names its own file
        sys.exit(f"error: {e}")
    except (ValueError, KeyError) as e:  # a malformed config.json, index or GGUF file
        sys.exit(f"error: {args.source}: cannot read it ({type(e).__name__}: {e})")
    print_summary(header, layers, plan, args, size)


def print_summary(h, layers, plan, args, size):
    params = sum(math.prod(shape) for _, shape, _, _ in plan)
    rope = next(k for k, v in ROPE_TYPES.items() if v == layers[0]["rope_type"])
    sliding = [lc["window"] for lc in layers if lc["attn_kind"] == ATTN_SLIDING]
    print(f"{h['arch']}: {h['n_layers']} layers, dim {h['dim']}, {h['n_heads']} heads / {h['n_kv_heads']} kv heads, "
          f"head_dim {h['head_dim']}, vocab {h['vocab_size']}{', tied embeddings' if h['tied_embeddings'] else ''}")
    print(f"RoPE {rope}, theta {layers[0]['rope_theta']:g}; "
          + (f"{len(sliding)} sliding layers (window {max(sliding)})" if sliding else "full attention"))
    print(f"{params / 1e6:.1f}M parameters, {args.dtype}, {size / 1e6:.1f} MB -> {args.out}")


if __name__ == "__main__":
    main()
