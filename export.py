"""export.py - write a longrun model file from a Hugging Face checkpoint or a GGUF file.

    python export.py SOURCE OUT [--dtype f32|f16|bf16|q8_0] [--tokenizer-only]

SOURCE is a Hugging Face model directory (config.json + model.safetensors, or a sharded
checkpoint with model.safetensors.index.json) or a llama-architecture .gguf file.

The output is the little-endian file that model.h defines and run.c mmaps:

    offset 0              FileHeader (128 bytes): dimensions, flags, section offsets, arch
    128                   LayerConfig[n_layers] (64 bytes each): attention kind, window, RoPE
    tensor_table_offset   TensorEntry[n_tensors] (80 bytes each): name, dtype, shape, offset, size
    tokenizer_offset      tokenizer section (model.h TokHeader...; from tokenizer.json,
                          tokenizer.model or GGUF tokenizer.ggml.* metadata)
    ...                   tensor data, each tensor starting on a 64-byte boundary

Weights keep the Hugging Face layout (rows = out features, rotate-half q/k order), so HF
tensors are copied as they are (Phi-3's fused qkv_proj / gate_up_proj are split by rows); GGUF
q/k rows are un-permuted back to that order.
Vectors (norms, biases, RoPE factor lists) are always f32; matrices take --dtype.
Only numpy and the standard library are needed, plus the `gguf` package for GGUF input.
"""
import argparse
import json
import math
import os
import re
import signal
import struct
import sys
import tempfile
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
# Config values: a config.json or GGUF key may hold any type, so each one is checked before
# any arithmetic, against the ranges run.c's read_config and check_rope_config accept (a file
# run would refuse is never written).

DIM_LIMIT = 1 << 20   # run.c: a dimension beyond a million is a corrupt file
MAX_LAYERS = 4096     # run.c's n_layers limit
MAX_VOCAB = 1 << 24   # run.c's vocab_size limit
U32_MAX = (1 << 32) - 1
F32_MAX = float(np.finfo(np.float32).max)


def shown(value):
    """A config value for an error line: repr() escapes control bytes; long values are cut."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_int(value, what, lo=1, hi=DIM_LIMIT):
    """value, which must be an integer in [lo, hi] (not a bool, a float or null)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ExportError(f"{what} = {shown(value)} must be an integer in [{lo}, {hi}]")
    return int(value)


def config_float(value, what):
    """value as a float; it must be a number that float32 holds as a finite value (the file
    stores float32). Range checks come after, in check_config / check_layers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ExportError(f"{what} = {shown(value)} must be a number")
    if not abs(float(value)) <= F32_MAX:  # also false for NaN
        raise ExportError(f"{what} = {shown(value)} must be a finite float32 number")
    return float(value)


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
    # an all-zero block keeps q = 0
    q = np.divide(blocks, d, out=np.zeros_like(blocks), where=d > 0)
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
            raise ExportError(f"{name} has |value| {big:g}, beyond float16 range; "
                              "use --dtype bf16 or f32")
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


def safetensors_files(model_dir):
    """The checkpoint files of an HF directory: the shards model.safetensors.index.json names,
    else model.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        files = weight_map.values() if isinstance(weight_map, dict) else [None]
        if not all(isinstance(file, str) for file in files):
            raise ExportError(f"{index}: no weight_map of tensor name -> file name")
        return [os.path.join(model_dir, file) for file in sorted(set(weight_map.values()))]
    if os.path.exists(os.path.join(model_dir, "model.safetensors")):
        return [os.path.join(model_dir, "model.safetensors")]
    raise ExportError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                      "(PyTorch .bin checkpoints are not supported)")


def safetensors_entry(path, name, info, data_start, file_size):
    """(path, absolute byte offset, dtype, shape) of one header entry, checked against the file."""
    try:
        begin, end = info["data_offsets"]
        dtype, shape = info["dtype"], tuple(info["shape"])
        for n in (begin, end, *shape):
            config_int(n, "offset or dimension", 0, file_size)
    except (KeyError, TypeError, ValueError, ExportError):
        raise ExportError(f"{path}: header entry {shown(name)} is malformed (dtype, shape, "
                          f"data_offsets: {shown(info)})") from None
    if not isinstance(dtype, str):
        raise ExportError(f"{path}: {shown(name)} has dtype {shown(dtype)}")
    if dtype in ST_DTYPES and end - begin != math.prod(shape) * np.dtype(ST_DTYPES[dtype]).itemsize:
        raise ExportError(f"{path}: {shown(name)} has {end - begin} bytes, its shape needs "
                          "another size")
    if not begin <= end or data_start + end > file_size:
        raise ExportError(f"{path}: {shown(name)} (bytes {begin}..{end} of the data) runs past the "
                          f"end of the file ({file_size} bytes): it is truncated or corrupt")
    return path, data_start + begin, dtype, shape


class Safetensors:
    """The tensors of a (possibly sharded) safetensors checkpoint, looked up by our names and
    read lazily through np.memmap. Each file is: u64 little-endian header length n, n bytes of
    JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the data (offsets count from
    its start)."""

    def __init__(self, model_dir):
        self.entries = {}  # HF name -> (path, absolute byte offset, dtype, shape)
        for path in safetensors_files(model_dir):
            file_size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 0 < n <= file_size - 8:  # checked before reading n bytes: n may be 2^63
                    raise ExportError(f"{path}: not a safetensors file (bad header: length {n}, "
                                      f"file {file_size} bytes)")
                try:
                    header = json.loads(f.read(n))
                except ValueError:  # UnicodeDecodeError is a ValueError too
                    raise ExportError(f"{path}: not a safetensors file (bad header)") from None
            if not isinstance(header, dict):
                raise ExportError(f"{path}: not a safetensors file (its header is no JSON object)")
            for name, info in header.items():
                if name != "__metadata__":
                    self.entries[name] = safetensors_entry(path, name, info, 8 + n, file_size)

    def describe(self, name):
        return source_name(name, HF)

    def shape(self, name):
        """Shape of a tensor we are going to read (None if absent), checking its dtype."""
        entry = self.entries.get(self.describe(name))
        if entry and entry[2] not in ST_DTYPES:
            raise ExportError(f"{self.describe(name)}: dtype {entry[2]} is not supported "
                              "(F32, F16, BF16 are)")
        return entry and entry[3]

    def load(self, name):
        return self.read(self.describe(name))

    def read(self, hf_name):
        """One HF tensor as float32 (a view of the file when it is stored as F32)."""
        path, offset, dtype, shape = self.entries[hf_name]
        raw = np.memmap(path, dtype=ST_DTYPES[dtype], mode="r", offset=offset,
                        shape=(math.prod(shape),))
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            bits = raw.astype(np.uint32)
            bits <<= 16
            return bits.view(np.float32).reshape(shape)
        return raw.astype(np.float32, copy=False).reshape(shape)  # F32 stays a view of the file


class Phi3Safetensors(Safetensors):
    """Phi-3 fuses q, k, v into one qkv_proj (rows: q, then k, then v) and gate, up into one
    gate_up_proj (rows: gate, then up), as Phi3Attention and Phi3MLP slice them; our wq, wk, wv,
    w_gate, w_up are row ranges of those two tensors."""

    def __init__(self, model_dir, h):
        super().__init__(model_dir)
        Q, K, F = h["n_heads"] * h["head_dim"], h["n_kv_heads"] * h["head_dim"], h["hidden_dim"]
        qkv, gate_up = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"
        self.parts = {"wq": (qkv, 0, Q), "wk": (qkv, Q, Q + K), "wv": (qkv, Q + K, Q + 2 * K),
                      "w_gate": (gate_up, 0, F), "w_up": (gate_up, F, 2 * F)}
        self.fused_rows = {qkv: Q + 2 * K, gate_up: 2 * F}

    def part(self, name):
        """(HF name of the fused tensor, first row, end row), or None for an unfused tensor."""
        _, layer, role = name.split(".") if name.startswith("blk.") else ("", "", "")
        if role not in self.parts:
            return None
        fused, begin, end = self.parts[role]
        return f"model.layers.{layer}.{fused}", begin, end

    def describe(self, name):
        p = self.part(name)
        return f"{p[0]} rows {p[1]}:{p[2]}" if p else super().describe(name)

    def shape(self, name):
        p = self.part(name)
        if not p:
            return super().shape(name)
        entry = self.entries.get(p[0])
        if entry is None:
            return None
        if entry[2] not in ST_DTYPES:
            raise ExportError(f"{p[0]}: dtype {entry[2]} is not supported (F32, F16, BF16 are)")
        rows = self.fused_rows[p[0].split(".", 3)[3]]
        if len(entry[3]) != 2 or entry[3][0] != rows:
            raise ExportError(f"tensor {p[0]} has shape {list(entry[3])}, expected {rows} rows "
                              f"(the fused parts the config implies)")
        return (p[2] - p[1], entry[3][1])

    def load(self, name):
        p = self.part(name)
        return self.read(p[0])[p[1]:p[2]] if p else super().load(name)


# Per architecture: our arch name, and transformers 5.23's config-class defaults for the keys
# export.py reads, used when config.json leaves one out (so we build the model HF would build).
COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
                   "num_key_value_heads": None, "head_dim": None, "rope_theta": 10000.0}
QWEN_DEFAULTS = {"num_key_value_heads": 32, "max_position_embeddings": 32768,
                 "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
ARCHS = {
    "LlamaForCausalLM": ("llama", {"max_position_embeddings": 2048, "attention_bias": False,
                                   "mlp_bias": False}),
    "MistralForCausalLM": ("mistral", {"num_key_value_heads": 8, "max_position_embeddings": 131072,
                                       "sliding_window": 4096}),
    "Qwen2ForCausalLM": ("qwen2", QWEN_DEFAULTS),
    "Qwen3ForCausalLM": ("qwen3", {**QWEN_DEFAULTS, "head_dim": 128, "attention_bias": False}),
    # Phi-3-mini-4k/128k, Phi-3.5-mini, Phi-3-medium: fused qkv and gate_up; Phi3Config has its own
    # original_max_position_embeddings (4096), which takes priority over the rope dict's
    "Phi3ForCausalLM": ("phi3", {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                                 "original_max_position_embeddings": 4096, "sliding_window": None}),
}


def hf_rope(cfg, arch, head_dim):
    """LayerConfig RoPE fields (+ longrope factor tensors) from v4 `rope_scaling` + `rope_theta`
    or v5 `rope_parameters`, following transformers' standardize_rope_params."""
    rp = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}  # HF: rope_scaling wins
    if not isinstance(rp, dict):
        raise ExportError(f"rope_scaling / rope_parameters = {shown(rp)} must be a JSON object")
    if rp and set(rp) <= set(cfg.get("layer_types") or ()):
        raise ExportError("per-layer-type rope_parameters are not supported for this architecture")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if not isinstance(kind, str):
        raise ExportError(f"rope_type = {shown(kind)} must be a string")
    kind = "longrope" if kind == "su" else kind  # "su": Phi-3's early name for LongRoPE
    if arch == "phi3":  # Phi3Config renames "yarn" to longrope too and accepts nothing else
        kind = "longrope" if kind == "yarn" else kind
        if kind not in ("default", "longrope"):
            raise ExportError(f"RoPE type '{kind}' is not supported for Phi3ForCausalLM "
                              "(transformers takes default and longrope)")
    if kind not in ROPE_TYPES:
        raise ExportError(f"RoPE type '{kind}' is not supported (known: {', '.join(ROPE_TYPES)})")
    # the dict's rope_theta wins over the top-level one, as in HF
    theta = config_float(rp.get("rope_theta") or cfg["rope_theta"] or 10000.0, "rope_theta")
    prf = config_float(rp.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0,
                       "partial_rotary_factor")
    if prf != 1.0 and arch != "phi3":  # only Phi3's rotary code honours it: Llama, Mistral and Qwen
        # rotate the whole head with default RoPE and fail on a shape mismatch with a scaled one
        raise ExportError(f"partial_rotary_factor {prf} is not supported for "
                          f"{cfg['architectures'][0]} (transformers rotates the whole head for it)")
    rotary_dim = int(head_dim * prf)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ExportError(f"rotary dimension {rotary_dim} (head_dim {head_dim} x {prf}) "
                          "must be even, 2..head_dim")
    rope = {"rope_type": ROPE_TYPES[kind], "rotary_dim": rotary_dim, "rope_theta": theta}

    def need(key):
        if rp.get(key) is None:
            raise ExportError(f"RoPE type '{kind}' needs '{key}' in the rope config")
        return config_float(rp[key], f"rope {key}")

    def optional(key, default):  # HF reads these with `or`, so 0 / null mean the default
        return config_float(rp.get(key) or default, f"rope {key}")

    max_pos = cfg["max_position_embeddings"]  # read_hf has checked it
    orig = (cfg.get("original_max_position_embeddings")
            or rp.get("original_max_position_embeddings") or max_pos)
    orig = config_int(orig, "original_max_position_embeddings", 1, U32_MAX)
    if kind in ("linear", "dynamic", "llama3"):
        rope["factor"] = need("factor")
    if kind == "dynamic":  # HF's dynamic NTK grows from max_position_embeddings, whatever L0 says
        rope["orig_ctx"] = max_pos
    if kind in ("yarn", "llama3", "longrope"):
        rope["orig_ctx"] = orig  # Phi-3 keeps it top-level, and that copy takes priority
    if kind in ("yarn", "longrope"):
        rope["factor"] = optional("factor", max_pos / orig)  # v5: explicit factor, else M / L0
        attention_factor = rp.get("attention_factor")
        given = attention_factor is not None
        if given and not config_float(attention_factor, "attention_factor") > 0:
            raise ExportError(f"{kind} attention_factor {attention_factor} is not supported "
                              "(it must be > 0)")
        rope["attention_factor"] = attention_factor or 0.0  # 0: run.c derives it
    if kind == "yarn":
        rope.update(beta_fast=optional("beta_fast", 32.0), beta_slow=optional("beta_slow", 1.0),
                    mscale=optional("mscale", 0.0), mscale_all_dim=optional("mscale_all_dim", 0.0),
                    yarn_truncate=int(bool(rp.get("truncate", True))))
    if kind == "llama3":
        rope.update(low_freq_factor=need("low_freq_factor"),
                    high_freq_factor=need("high_freq_factor"))
    factors = {}
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            if rp.get(key) is None:
                raise ExportError(f"RoPE type '{kind}' needs '{key}' in the rope config")
            if not isinstance(rp[key], list):
                raise ExportError(f"longrope {key} = {shown(rp[key])} must be a list of numbers")
            values = np.asarray([config_float(v, f"longrope {key}") for v in rp[key]], np.float32)
            if values.shape != (rotary_dim // 2,):
                raise ExportError(f"longrope {key} has {values.size} values, "
                                  f"rotary_dim/2 = {rotary_dim // 2}")
            if not (np.isfinite(values).all() and (values > 0).all()):
                raise ExportError(f"longrope {key} must hold positive finite numbers")
            factors["rope." + key] = values
    return rope, factors


def hf_windows(cfg, arch, n_layers):
    """Per-layer (attn_kind, window) as transformers builds the masks."""
    full = [(ATTN_FULL, 0)] * n_layers
    if arch == "mistral":  # every layer slides when sliding_window is set; layer_types is ignored
        w = cfg["sliding_window"]
        if not w:
            return full
        return [(ATTN_SLIDING, config_int(w, "sliding_window", 1, U32_MAX))] * n_layers
    if arch == "phi3":  # Phi3Model masks every layer with sliding_window unless it is null
        # (Phi-3-mini-4k has 2047, within its trained 4096; the 128k ones 262144)
        w = cfg["sliding_window"]
        if w is None:
            return full
        return [(ATTN_SLIDING, config_int(w, "sliding_window", 1, U32_MAX))] * n_layers
    if arch in ("qwen2", "qwen3"):  # Qwen2Config.__post_init__: no window unless use_sliding_window
        w = cfg["sliding_window"] if cfg["use_sliding_window"] else None
        if w is not None and not cfg.get("layer_types"):
            config_int(cfg["max_window_layers"], "max_window_layers", 0, U32_MAX)
        types = cfg.get("layer_types") or [
            "sliding_attention" if w is not None and i >= cfg["max_window_layers"]
            else "full_attention" for i in range(n_layers)]
        if len(types) != n_layers or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ExportError(f"layer_types must list {n_layers} of "
                              "full_attention/sliding_attention")
        if "sliding_attention" in types and not w:
            raise ExportError("layer_types has sliding layers but no sliding window is set "
                              "(use_sliding_window / sliding_window)")
        if "sliding_attention" in types:
            config_int(w, "sliding_window", 1, U32_MAX)
        return [(ATTN_SLIDING, w) if t == "sliding_attention" else (ATTN_FULL, 0) for t in types]
    return full


def read_hf(model_dir):
    """Header fields, per-layer configs, extra tensors and a tensor source for an HF directory."""
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise ExportError(f"{model_dir}: no config.json (not a Hugging Face model directory?)")
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ExportError(f"{model_dir}/config.json is a {type(raw).__name__}, not a JSON object")
    names = raw.get("architectures")
    names_ok = isinstance(names, list) and all(isinstance(a, str) for a in names)
    if names is not None and not names_ok:
        raise ExportError(f"architectures = {shown(names)} must be a list of class names, "
                          "e.g. [\"LlamaForCausalLM\"]")
    name = (names or ["(none)"])[0]
    if name not in ARCHS:
        raise ExportError(f"architecture {name} is not supported (supported: {', '.join(ARCHS)})")
    arch, defaults = ARCHS[name]
    cfg = {**COMMON_DEFAULTS, **defaults, **raw}  # as in HF, a key given as null overrides defaults
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):
        if key not in cfg:
            raise ExportError(f"config.json has no '{key}'")
    # every number the header takes, checked before any arithmetic on it (run.c's ranges)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                "max_position_embeddings"):
        config_int(cfg[key], key)
    config_int(cfg["num_hidden_layers"], "num_hidden_layers", 1, MAX_LAYERS)
    config_int(cfg["vocab_size"], "vocab_size", 1, MAX_VOCAB)
    for key in ("num_key_value_heads", "head_dim"):  # null: the default (all heads; hidden / heads)
        if cfg[key] is not None:
            config_int(cfg[key], key)
    layer_types = cfg.get("layer_types")
    types_ok = isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)
    if layer_types is not None and not types_ok:
        raise ExportError(f"layer_types = {shown(layer_types)} must be a list of strings")
    if cfg["hidden_act"] != "silu":
        raise ExportError(f"hidden_act '{cfg['hidden_act']}' is not supported (only silu)")
    # Phi3's layers never have biases, whatever the config says.
    if cfg.get("mlp_bias") and arch != "phi3":
        raise ExportError("mlp_bias: true is not supported (the model file has no MLP biases)")
    # HF gives o_proj a bias too, which model.h has no slot for.
    if cfg.get("attention_bias") and arch != "phi3":
        raise ExportError("attention_bias: true is not supported "
                          "(o_proj bias has no place in the model file)")
    heads = cfg["num_attention_heads"]
    if arch == "phi3" and cfg["head_dim"] not in (None, cfg["hidden_size"] // heads):
        # Phi3Config has no head_dim: its factor lists are checked against hidden_size / heads
        raise ExportError(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads "
                          "is not supported for Phi-3")
    header = {"arch": arch, "n_layers": cfg["num_hidden_layers"], "dim": cfg["hidden_size"],
              "hidden_dim": cfg["intermediate_size"], "n_heads": heads,
              "n_kv_heads": cfg["num_key_value_heads"] or heads,
              "head_dim": cfg["head_dim"] or cfg["hidden_size"] // heads,
              "vocab_size": cfg["vocab_size"], "max_seq_len": cfg["max_position_embeddings"],
              "norm_eps": cfg["rms_norm_eps"],
              "tied_embeddings": int(bool(cfg["tie_word_embeddings"])),
              "qkv_bias": int(arch == "qwen2"), "qk_norm": int(arch == "qwen3")}
    rope, factors = hf_rope(cfg, arch, header["head_dim"])
    layers = [{**rope, "attn_kind": kind, "window": w}
              for kind, w in hf_windows(cfg, arch, header["n_layers"])]
    source = Phi3Safetensors(model_dir, header) if arch == "phi3" else Safetensors(model_dir)
    return header, layers, factors, source


# ----------------------------------------------------------------------------
# GGUF files (llama architecture), dequantized with the gguf package

def unpermute_rows(w, n_head):
    """llama.cpp stores q/k rows in Meta's interleaved-pair order; HF (rotate-half) row
    h*(H/2) + j is Meta row 2j + h within each head."""
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
        # GGUF lists ne0 = cols first
        return None if t is None else tuple(int(n) for n in reversed(t.shape))

    def load(self, name):
        t = self.tensors[self.describe(name)]
        try:
            w = self.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise ExportError(f"{t.name}: GGUF type {t.tensor_type.name} cannot be dequantized "
                              "by gguf") from None
        w = w.reshape(self.shape(name))
        role = name.split(".")[-1]
        if name.startswith("blk.") and role in self.heads:
            return unpermute_rows(w, self.heads[role])
        return w


def open_gguf(path):
    """gguf.GGUFReader over path; a file it cannot parse (cut short, not GGUF) is an ExportError."""
    try:
        import gguf  # imported here so that HF exports need only numpy
    except ImportError:
        raise ExportError("reading GGUF needs the gguf package: pip install gguf") from None
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not a readable GGUF file, truncated or corrupt "
                          f"({type(e).__name__}: {e})") from None


def read_gguf(path):
    """Header fields, per-layer configs and a tensor source for a llama-architecture GGUF file."""
    reader = open_gguf(path)
    import gguf  # open_gguf has checked it is installed

    def meta(key, default=None):  # no default: the key is required
        field = reader.fields.get(key)
        if field is None and default is None:
            raise ExportError(f"{path}: GGUF metadata has no '{key}'")
        return default if field is None else field.contents()

    if meta("general.architecture") != "llama":
        raise ExportError(f"GGUF architecture '{meta('general.architecture')}' is not supported "
                          "(only llama)")
    if meta("llama.expert_count", 0):
        raise ExportError("mixture-of-experts GGUF models are not supported")
    names = {t.name for t in reader.tensors}
    if any(n.endswith(".bias") for n in names):
        raise ExportError("GGUF bias tensors are not supported")
    dim = config_int(meta("llama.embedding_length"), "llama.embedding_length")
    heads = config_int(meta("llama.attention.head_count"), "llama.attention.head_count")
    head_dim = meta("llama.attention.key_length", dim // heads)
    if meta("llama.attention.value_length", head_dim) != head_dim:
        raise ExportError("GGUF key_length and value_length differ")
    vocab = meta("llama.vocab_size", 0) or len(meta("tokenizer.ggml.tokens", []))
    if not vocab:
        raise ExportError(f"{path}: GGUF has neither llama.vocab_size nor tokenizer.ggml.tokens")
    # the q/k un-permutation assumes full rotary
    if meta("llama.rope.dimension_count", head_dim) != head_dim:
        raise ExportError("partial rotary (rope.dimension_count != head_dim) is not supported "
                          "for GGUF")
    header = {"arch": "llama", "n_layers": meta("llama.block_count"), "dim": dim,
              "hidden_dim": meta("llama.feed_forward_length"), "n_heads": heads,
              "n_kv_heads": meta("llama.attention.head_count_kv", heads), "head_dim": head_dim,
              "vocab_size": vocab, "max_seq_len": meta("llama.context_length"),
              "norm_eps": meta("llama.attention.layer_norm_rms_epsilon"),
              "tied_embeddings": int("output.weight" not in names), "qkv_bias": 0, "qk_norm": 0}
    check_config(header)  # before n_layers sizes a list and head_dim divides
    source = GgufSource(reader, gguf.quants.dequantize, heads, header["n_kv_heads"])
    rope_freqs = None
    if "rope_freqs.weight" in names:  # llama.cpp's Llama 3.1 scaling: one divisor per channel pair
        t = source.tensors["rope_freqs.weight"]
        rope_freqs = gguf.quants.dequantize(t.data, t.tensor_type)
        rope_freqs = np.asarray(rope_freqs, dtype=np.float32).reshape(-1)
    rope, factors = gguf_rope(meta, head_dim, header["max_seq_len"], rope_freqs)
    layers = [{**rope, "attn_kind": ATTN_FULL, "window": 0} for _ in range(header["n_layers"])]
    return header, layers, factors, source


def gguf_rope(meta, head_dim, max_seq_len, rope_freqs=None):
    """LayerConfig RoPE fields (+ factor tensors) from llama.cpp's rope keys and its rope_freqs
    tensor, as llama.cpp applies them. Its kernel computes, per pair i,
        theta = p b^(-2i/d) / ff_i / s        (ff_i = rope_freqs, 1 without it; s = 1 for none)
    and scales cos/sin by attn_factor (rope.scaling.attn_factor, default 1); YaRN ramps between
    the /s and unscaled angles with HF's range and multiplies the scale by 0.1 ln s + 1.
    A per-pair divisor with a fixed scale is exactly our longrope with equal short and long
    lists, so llama3's rope_freqs (and a linear scale with an attn_factor) is stored that way."""
    def number(key, default):
        return config_float(meta(key, default), key)

    rope = {"rope_type": ROPE_TYPES["default"], "rotary_dim": head_dim,
            "rope_theta": number("llama.rope.freq_base", 10000.0)}
    kind = meta("llama.rope.scaling.type", "linear")  # llama.cpp's default when the key is absent
    # the older key scale_linear, when the newer one is absent or 0
    factor = (number("llama.rope.scaling.factor", 0.0) or number("llama.rope.scale_linear", 0.0)
              or 1.0)
    attn = number("llama.rope.scaling.attn_factor", 1.0)
    orig = config_int(meta("llama.rope.scaling.original_context_length", 0) or max_seq_len,
                      "llama.rope.scaling.original_context_length", 1, U32_MAX)
    if kind not in ("none", "linear", "yarn"):
        raise ExportError(f"GGUF rope scaling '{kind}' is not supported (none, linear, yarn are)")
    if not (factor > 0 and attn > 0):
        raise ExportError(f"GGUF rope.scaling.factor {factor} / attn_factor {attn} must be > 0")
    if kind == "none":
        factor = 1.0  # llama.cpp ignores the factor then
    for key, unset in (("yarn_log_multiplier", 0.0), ("yarn_attn_factor", 1.0)):
        if meta(f"llama.rope.scaling.{key}", unset) != unset:  # DeepSeek-style, version dependent
            raise ExportError(f"GGUF rope.scaling.{key} is not supported")
    if kind == "yarn":
        if rope_freqs is not None:
            raise ExportError("GGUF rope_freqs together with yarn scaling is not supported")
        # < 0: unset, which is 1 for yarn
        ext_factor = meta("llama.rope.scaling.yarn_ext_factor", -1.0)
        if not (ext_factor < 0 or ext_factor == 1.0):
            raise ExportError("GGUF rope.scaling.yarn_ext_factor other than 1 is not supported")
        # a = attn_factor (0.1 ln s + 1): llama.cpp multiplies its attn_factor by YaRN's own scale
        mscale = 0.1 * math.log(factor) + 1 if factor > 1 else 1
        rope.update(rope_type=ROPE_TYPES["yarn"], factor=factor, orig_ctx=orig, yarn_truncate=1,
                    attention_factor=0.0 if attn == 1.0 else attn * mscale,
                    beta_fast=number("llama.rope.scaling.yarn_beta_fast", 32.0),
                    beta_slow=number("llama.rope.scaling.yarn_beta_slow", 1.0))
        return rope, {}
    if rope_freqs is None and attn == 1.0:
        if factor != 1.0:
            rope.update(rope_type=ROPE_TYPES["linear"], factor=factor)
        return rope, {}
    if rope_freqs is None:
        ff = np.ones(head_dim // 2, np.float32)
    else:
        ff = np.asarray(rope_freqs, np.float32)
    if ff.shape != (head_dim // 2,) or not (np.isfinite(ff).all() and (ff > 0).all()):
        raise ExportError(f"GGUF rope_freqs must hold {head_dim // 2} positive numbers "
                          f"(head_dim / 2), got {ff.size}")
    ff = ff * np.float32(factor)  # 1 / (ff s b^(2i/d)): the divisor and the linear scale in one
    rope.update(rope_type=ROPE_TYPES["longrope"], factor=1.0, attention_factor=attn, orig_ctx=orig)
    return rope, {"rope.short_factor": ff, "rope.long_factor": ff.copy()}


# ----------------------------------------------------------------------------
# Writing the model file

def expected_tensors(h):
    """(name, shape) of every tensor the header implies, in file order (model.h's list)."""
    D, F, V, H = h["dim"], h["hidden_dim"], h["vocab_size"], h["head_dim"]
    Q, K = h["n_heads"] * H, h["n_kv_heads"] * H
    yield "tok_embd", (V, D)
    for i in range(h["n_layers"]):
        b = f"blk.{i}."
        yield from [(b + "attn_norm", (D,)), (b + "wq", (Q, D)), (b + "wk", (K, D)),
                    (b + "wv", (K, D)), (b + "wo", (D, Q))]
        if h["qkv_bias"]:
            yield from [(b + "bq", (Q,)), (b + "bk", (K,)), (b + "bv", (K,))]
        if h["qk_norm"]:
            yield from [(b + "q_norm", (H,)), (b + "k_norm", (H,))]
        yield from [(b + "ffn_norm", (D,)), (b + "w_gate", (F, D)), (b + "w_up", (F, D)),
                    (b + "w_down", (D, F))]
    yield "output_norm", (D,)
    if not h["tied_embeddings"]:
        yield "output", (V, D)


def check_config(h):
    """The header's values against run.c's read_config ranges."""
    for key in ("dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
        config_int(h[key], key)
    config_int(h["n_layers"], "n_layers", 1, MAX_LAYERS)
    config_int(h["vocab_size"], "vocab_size", 1, MAX_VOCAB)
    if h["n_heads"] % h["n_kv_heads"]:
        raise ExportError(f"n_heads {h['n_heads']} is not a multiple of "
                          f"n_kv_heads {h['n_kv_heads']}")
    if h["n_heads"] * h["head_dim"] > DIM_LIMIT:
        raise ExportError(f"n_heads x head_dim = {h['n_heads'] * h['head_dim']} is above "
                          f"{DIM_LIMIT}")
    eps = np.float32(config_float(h["norm_eps"], "rms_norm_eps"))  # checked as the file stores it
    if not 0 <= eps < 1:
        raise ExportError(f"rms_norm_eps {h['norm_eps']} is out of range [0, 1)")


def yarn_scale(s, m):
    """YaRN's magnitude rule 0.1 m ln s + 1 (1 for s <= 1), as run.c's yarn_mscale."""
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1


def derived_attention_factor(lc):
    """The factor run.c's rope_frequencies multiplies cos and sin by, from the float32 fields
    (YaRN: the stored one, else g(s, mscale) / g(s, mscale_all_dim) when both are set, else
    g(s, 1); LongRoPE: the stored one, else sqrt(1 + ln s / ln L0) for s > 1; others: 1).
    Infinity when it divides by zero."""
    f = {key: float(np.float32(lc.get(key, 0))) for key in ("factor", "attention_factor", "mscale",
                                                            "mscale_all_dim")}
    s = f["factor"]
    try:
        if lc["rope_type"] == ROPE_TYPES["yarn"]:
            if f["attention_factor"] > 0:
                return f["attention_factor"]
            if f["mscale"] and f["mscale_all_dim"]:
                return yarn_scale(s, f["mscale"]) / yarn_scale(s, f["mscale_all_dim"])
            return yarn_scale(s, 1)
        if lc["rope_type"] == ROPE_TYPES["longrope"]:
            if f["attention_factor"] > 0:
                return f["attention_factor"]
            return math.sqrt(1 + math.log(s) / math.log(lc["orig_ctx"])) if s > 1 else 1.0
    except (ZeroDivisionError, ValueError):  # a zero divisor, or the root of a negative number
        return math.inf
    return 1.0


def check_layers(h, layers):
    """Each LayerConfig against run.c's read_config and check_rope_config, on the float32
    values the file will hold, so run never refuses what export.py wrote."""
    for i, lc in enumerate(layers):
        for name, code in LAYER_FIELDS:  # every field is packable: u32 or a finite float32
            if code == "I":
                config_int(lc.get(name, 0), f"layer {i} {name}", 0, U32_MAX)
            else:
                config_float(lc.get(name, 0.0), f"layer {i} {name}")
        if lc["attn_kind"] == ATTN_SLIDING and lc["window"] < 1:
            raise ExportError(f"layer {i}: a sliding window of {lc['window']} keys (must be >= 1)")
        if lc["rotary_dim"] % 2 or lc["rotary_dim"] > h["head_dim"]:
            raise ExportError(f"layer {i}: rotary_dim {lc['rotary_dim']} must be even and at "
                              "most head_dim")
        f32 = {name: np.float32(lc.get(name, 0.0)) for name, code in LAYER_FIELDS if code == "f"}
        if lc["rotary_dim"] and not f32["rope_theta"] > 1:
            raise ExportError(f"rope_theta {lc['rope_theta']} is out of range (it must be > 1)")
        kind = next(k for k, v in ROPE_TYPES.items() if v == lc["rope_type"])
        if lc["rotary_dim"] == 0 or kind == "default":
            continue
        if not (1 <= f32["factor"] < 1e6 or kind == "longrope" and f32["factor"] > 0):
            allowed = "> 0" if kind == "longrope" else "in [1, 1e6)"
            raise ExportError(f"{kind} RoPE factor {lc['factor']} is out of range ({allowed})")
        lc = {**lc, "orig_ctx": lc.get("orig_ctx") or h["max_seq_len"]}  # as run.c reads 0
        if not 0 <= f32["attention_factor"] < 100:
            raise ExportError(f"RoPE attention_factor {lc['attention_factor']} is out of range "
                              "[0, 100)")
        if kind == "yarn" and not f32["beta_fast"] > f32["beta_slow"] > 0:
            raise ExportError(f"yarn needs beta_fast > beta_slow > 0, got {lc['beta_fast']} and "
                              f"{lc['beta_slow']}")
        if kind == "llama3" and not f32["high_freq_factor"] > f32["low_freq_factor"] > 0:
            raise ExportError(f"llama3 RoPE needs high_freq_factor > low_freq_factor > 0, got "
                              f"{lc['high_freq_factor']} and {lc['low_freq_factor']}")
        a = derived_attention_factor(lc)
        if not 0 < a < 100:  # the range of a stored attention_factor: q.k grows by a^2
            raise ExportError(f"{kind} RoPE settings give an attention factor of {a:.2g} (factor "
                              f"{lc['factor']}, mscale {lc.get('mscale', 0)}, mscale_all_dim "
                              f"{lc.get('mscale_all_dim', 0)}, orig_ctx {lc['orig_ctx']}); "
                              "it must be in (0, 100)")


def check_factor_lists(factors):
    """LongRoPE lists (from config.json, or GGUF rope_freqs times the linear scale): run.c
    divides by each value e in float32 for the frequency 1 / (e b^(2i/d)), b^(2i/d) >= 1, so
    every e must be finite and 1 / e finite too."""
    for name, values in factors.items():
        values = np.asarray(values, np.float32)
        with np.errstate(divide="ignore", over="ignore"):
            usable = np.isfinite(values) & (values > 0) & np.isfinite(np.float32(1) / values)
        if not usable.all():
            bad = float(values[~usable][0])
            raise ExportError(f"{name} holds {bad:g}: each value must be positive and finite, "
                              "with a finite reciprocal in float32")


def plan_tensors(h, factors, source, dtype):
    """Check every tensor is present with the right shape, before a byte is written, and
    choose each one's dtype. Returns [(name, shape, dtype, load)]."""
    plan = []
    for name, shape in expected_tensors(h):
        got = source.shape(name)
        if got is None:
            raise ExportError(f"missing tensor {source.describe(name)}")
        if tuple(got) != shape:
            raise ExportError(f"tensor {source.describe(name)} has shape {list(got)}, "
                              f"expected {list(shape)}")
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


def write_model(path, header, layers, plan, tokenizer=b""):
    """Header, layer table, tensor table and tokenizer section first (all sizes are known up
    front), then each tensor loaded, encoded and written one at a time so memory stays at
    about one tensor."""
    table_offset = HEADER.size + LAYER.size * len(layers)
    tok_offset = (table_offset + TENSOR.size * len(plan) + 7) // 8 * 8 if tokenizer else 0
    table_end = table_offset + TENSOR.size * len(plan)
    offset = align(tok_offset + len(tokenizer) if tokenizer else table_end)
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
              "tokenizer_offset": tok_offset, "tokenizer_size": len(tokenizer),
              "file_size": file_size}

    def fill(f):
        f.write(pack(HEADER, HEADER_FIELDS, header))
        for layer in layers:
            f.write(pack(LAYER, LAYER_FIELDS, layer))
        for e in entries:
            f.write(pack(TENSOR, TENSOR_FIELDS, e))
        if tokenizer:
            f.write(b"\0" * (tok_offset - f.tell()) + tokenizer)
        for e, (name, shape, dtype, load) in zip(entries, plan):
            f.write(b"\0" * (e["offset"] - f.tell()))
            for part in encode(np.asarray(load(), dtype=np.float32).reshape(shape), dtype, name):
                f.write(np.ascontiguousarray(part).data)
            assert f.tell() == e["offset"] + e["size"], f"{name}: wrote the wrong number of bytes"

    write_atomically(path, fill)
    return file_size


# The temporary OUT.tmp.XXXXXX being written, for the SIGTERM / SIGINT handler to remove
writing_tmp = None


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP arrived (raised by on_signal; main exits 128 + the signal)."""


def on_signal(signum, frame):
    """Remove the partial temporary, then unwind to main. Later signals are ignored so that
    nothing cuts the clean-up short."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if writing_tmp and os.path.exists(writing_tmp):
        os.remove(writing_tmp)
    raise Interrupted(signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def write_atomically(path, fill):
    """Write path through a new temporary path.tmp.XXXXXX beside it (fill(f) writes the bytes),
    renamed over path only when complete: an error or a signal never leaves a partial OUT, nor
    the temporary. mkstemp creates it exclusively, so an existing file or symlink of that name
    is never written through."""
    global writing_tmp
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=name + ".tmp.", dir=folder)
    try:
        writing_tmp = tmp  # from here on the file is ours to remove
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)   # as open() would have made it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.replace(tmp, path)
        writing_tmp = None
    except BaseException:
        # removed before writing_tmp is cleared: a signal handled in between finds it gone
        # or removes it itself
        if os.path.exists(tmp):
            os.remove(tmp)
        writing_tmp = None
        raise


# ----------------------------------------------------------------------------
# Tokenizer section (model.h "The tokenizer section"; read by tokenizer.c)
#
# Sources: a HF tokenizer.json (+ tokenizer_config.json), a SentencePiece tokenizer.model
# (parsed by hand below, no sentencepiece import), or GGUF tokenizer.ggml.* metadata.
# Anything the C tokenizer cannot reproduce exactly is refused with one line naming it.

TOK_MAGIC, TOK_VERSION, TOK_HEADER_SIZE = 0x4B4F544C, 1, 96
TOK_SPM, TOK_BYTE_BPE = 0, 1
PRE_NONE, PRE_GPT2, PRE_LLAMA3, PRE_QWEN2, PRE_SMOLLM = 0, 1, 2, 3, 4
PREFIX_NONE, PREFIX_ALL, PREFIX_ALWAYS, PREFIX_FIRST = 0, 1, 2, 3
T_NORMAL, T_UNKNOWN, T_CONTROL, T_USER_DEFINED, T_UNUSED, T_BYTE = 1, 2, 3, 4, 5, 6
CHAT_NONE, CHAT_CHATML, CHAT_LLAMA3, CHAT_LLAMA2_INST = 0, 1, 2, 3
FLAG_ADD_BOS, FLAG_NFC, FLAG_IGNORE_MERGES = 1, 2, 4
TYPE_LSTRIP, TYPE_RSTRIP = 0x100, 0x200   # above a special token's type: HF lstrip / rstrip

# The Split regexes of the Llama 3 and Qwen2 pre-tokenizers, as they appear in tokenizer.json.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
# GGUF tokenizer.ggml.pre names (llama.cpp's llama_vocab::load gives each its split) whose split
# is one tokenizer.c implements: name -> (pre-tokenizer, flags). Llama 3's ignore_merges goes
# with the names llama.cpp sets it for. GGUF records no normalizer: NFC only for qwen2, as
# Qwen2's tokenizer.json has it. Every other name is refused (see gguf_pre()).
_GGUF_SPLITS = [
    (PRE_GPT2, 0, "gpt2 gpt-2 default phi-2 mpt olmo jais trillion granite-docling jina-es "
                  "jina-de jina-v2-es jina-v2-de jina-v1-en jina-v2-code roberta-bpe gigachat "
                  "a.x-4.0 mellum modern-bert exaone4"),
    (PRE_LLAMA3, FLAG_IGNORE_MERGES, "llama-bpe llama3 llama-v3 falcon3 falcon-h1 pixtral "
                                     "midm-2.0 lfm2 jina-v5-nano"),
    (PRE_LLAMA3, 0, "dbrx smaug-bpe glm4 chatglm-bpe"),
    (PRE_QWEN2, FLAG_NFC, "qwen2"),
    (PRE_QWEN2, 0, "deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open"),
    (PRE_SMOLLM, 0, "smollm starcoder refact command-r codeshell exaone minerva-7b mellum2"),
]
GGUF_PRE = {name: (pre, flags) for pre, flags, names in _GGUF_SPLITS for name in names.split()}
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


class TokenizerError(ExportError):
    """A tokenizer this exporter cannot reproduce exactly."""


def byte_alphabet():
    """GPT-2's byte -> unicode char map (tokenizers byte_level.rs bytes_char)."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + n)
            n += 1
    return table


BYTE_DECODER = {c: b for b, c in byte_alphabet().items()}


def unmap_bytes(s):
    """A byte-level token string back to the bytes it stands for."""
    try:
        return bytes(BYTE_DECODER[c] for c in s)
    except KeyError as e:
        raise TokenizerError(f"byte-level token {s!r} has character {e.args[0]!r} outside "
                             "the byte alphabet")


def chat_template_id(template):
    if not template:
        return CHAT_NONE
    if "<|im_start|>" in template:
        return CHAT_CHATML
    if "<|start_header_id|>" in template:
        return CHAT_LLAMA3
    if "[INST]" in template:
        return CHAT_LLAMA2_INST
    return CHAT_NONE


def pack_tokenizer_section(kind, pre, prefix, flags, tokens, merges, bos, eos, eot, unk, chat):
    """tokens: [(bytes, score, type)] in id order; merges: [(left, right, result, rank)]."""
    n = len(tokens)
    entries_off = TOK_HEADER_SIZE
    merges_off = entries_off + 16 * n
    strings_off = merges_off + 16 * len(merges)
    blob, entries, offset = [], [], 0
    for text, score, typ in tokens:
        entries.append(struct.pack("<IIfI", offset, len(text), score, typ))
        blob.append(text)
        offset += len(text)
    strings = b"".join(blob)
    if len(strings) >= 1 << 32:
        raise TokenizerError("tokenizer strings exceed 4 GB")
    eot = eos if eot is None or eot < 0 else eot
    header = struct.pack("<6I2I4iI3I4Q", TOK_MAGIC, TOK_VERSION, kind, pre, prefix, flags, n,
                         len(merges), bos, eos, eot, unk, chat, 0, 0, 0, entries_off, merges_off,
                         strings_off, len(strings))
    assert len(header) == TOK_HEADER_SIZE
    merge_bytes = b"".join(struct.pack("<4I", *m) for m in merges)
    return header + b"".join(entries) + merge_bytes + strings


def spm_merges(tokens):
    """Merges of a SentencePiece BPE model from its scores: every split of a normal piece into
    two pieces, all ranked by the score of the piece they make (best first), as sentencepiece
    merges. tokens: [(bytes, score, type)]."""
    ids = {}
    for i, (text, _, typ) in enumerate(tokens):
        if typ in (T_NORMAL, T_UNUSED) and text not in ids:
            ids[text] = i
    order = sorted((i for i, t in enumerate(tokens) if t[2] == T_NORMAL),
                   key=lambda i: (-tokens[i][1], i))
    merges = []
    for rank, i in enumerate(order):
        text = tokens[i][0]
        s = text.decode("utf-8")
        pos = 0
        for ch in s[:-1]:
            pos += len(ch.encode("utf-8"))
            left, right = ids.get(text[:pos]), ids.get(text[pos:])
            if left is not None and right is not None:
                merges.append((left, right, i, rank))
    return merges


def token_ids(name, vocab):
    return vocab.get(name, -1) if name is not None else -1


# --- SentencePiece tokenizer.model: the protobuf, read by hand --------------------------

def _varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf):
    """Yield (field number, wire type, value) of one protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise TokenizerError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        yield field, wire, value


def parse_spm_model(data):
    """The parts of sentencepiece_model.proto ModelProto we need, with the proto defaults."""
    m = {"pieces": [], "model_type": 1, "byte_fallback": False, "unk_id": 0, "bos_id": 1,
         "eos_id": 2,
         "normalizer_name": "", "precompiled_charsmap": b"", "add_dummy_prefix": True,
         "remove_extra_whitespaces": True}
    for field, _, value in _fields(data):
        if field == 1:  # SentencePiece { piece = 1; score = 2; type = 3 }
            piece, score, typ = "", 0.0, T_NORMAL
            for f, _, v in _fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    typ = v
            m["pieces"].append((piece, score, typ))
        elif field == 2:  # TrainerSpec
            names = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id"}
            for f, _, v in _fields(value):
                if f in names:
                    v = v - (1 << 64) if v >= 1 << 63 else v  # int32 -1 is a 10-byte varint
                    m[names[f]] = bool(v) if f == 35 else v
        elif field == 3:  # NormalizerSpec
            for f, _, v in _fields(value):
                if f == 1:
                    m["normalizer_name"] = v.decode("utf-8")
                elif f == 2:
                    m["precompiled_charsmap"] = v
                elif f == 3:
                    m["add_dummy_prefix"] = bool(v)
                elif f == 4:
                    m["remove_extra_whitespaces"] = bool(v)
    return m


def tokenizer_section_from_spm(path, config=None, prefix=None):
    """A SentencePiece BPE tokenizer.model. prefix: a PREFIX_* to override the scheme that
    tokenizer_config's "legacy" selects (legacy or absent: every segment, like sentencepiece;
    legacy false: HF Metaspace "first")."""
    config = config or {}
    m = parse_spm_model(open(path, "rb").read())
    if m["model_type"] != 2:
        raise TokenizerError(f"{path}: SentencePiece model_type {m['model_type']} is not BPE (2); "
                             "unigram is not supported")
    normalizer = m["normalizer_name"]
    if normalizer not in ("identity", "") or (normalizer == "" and m["precompiled_charsmap"]):
        raise TokenizerError(f"{path}: SentencePiece normalizer {normalizer!r} is not supported "
                             "(only identity)")
    if m["remove_extra_whitespaces"]:
        raise TokenizerError(f"{path}: remove_extra_whitespaces is set; only models that keep "
                             "whitespace are supported")
    tokens = []
    for piece, score, typ in m["pieces"]:
        if typ == T_BYTE and not BYTE_TOKEN.fullmatch(piece):
            raise TokenizerError(f"{path}: byte piece {piece!r} is not <0xNN>")
        tokens.append((piece.encode("utf-8"), score, typ))
    if prefix is None:
        if not m["add_dummy_prefix"]:
            prefix = PREFIX_NONE
        else:
            prefix = PREFIX_FIRST if config.get("legacy") is False else PREFIX_ALL
    vocab = {p: i for i, (p, _, _) in reversed(list(enumerate(m["pieces"])))}
    bos, eos = m["bos_id"], m["eos_id"]
    chat = chat_template_id(config.get("chat_template"))
    flags = FLAG_ADD_BOS if config.get("add_bos_token", True) and bos >= 0 else 0
    return pack_tokenizer_section(TOK_SPM, PRE_NONE, prefix, flags, tokens, spm_merges(tokens),
                                  bos, eos, eot_id(chat, vocab, eos), m["unk_id"], chat)


def eot_id(chat, vocab, eos):
    name = {CHAT_CHATML: "<|im_end|>", CHAT_LLAMA3: "<|eot_id|>"}.get(chat)
    return vocab.get(name, eos) if name else eos


# --- HF tokenizer.json -----------------------------------------------------------------

def _special_name(config, key):
    v = config.get(key)
    return v.get("content") if isinstance(v, dict) else v


def _byte_level_pre(pre):
    """TOK_PRE_* of a byte-level pre_tokenizer, or raise naming what is unsupported."""
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in items]
    last = items[-1] if items else {}
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space", False):
        raise TokenizerError(f"unsupported byte-level pre_tokenizer {json.dumps(pre)[:200]}")
    if types == ["ByteLevel"] and last.get("use_regex", True):
        return PRE_GPT2
    if (types == ["Digits", "ByteLevel"] and items[0].get("individual_digits")
            and last.get("use_regex", True)):
        return PRE_SMOLLM
    if types == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        split = items[0]
        regex = split.get("pattern", {}).get("Regex")
        if (split.get("behavior") == "Isolated" and not split.get("invert")
                and regex in (LLAMA3_REGEX, QWEN2_REGEX)):
            return PRE_LLAMA3 if regex == LLAMA3_REGEX else PRE_QWEN2
    raise TokenizerError(f"unsupported byte-level pre_tokenizer {json.dumps(pre)[:300]}")


def tokenizer_section_from_json(tok, config=None):
    """A parsed tokenizer.json (dict) and its tokenizer_config.json (dict or None)."""
    config = config or {}
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"tokenizer.json model type {model.get('type')!r} is not supported "
                             "(only BPE)")
    unsupported = ("continuing_subword_prefix", "end_of_word_suffix", "dropout")
    if any(model.get(key) for key in unsupported):
        raise TokenizerError("tokenizer.json BPE with subword prefix/suffix or dropout is not "
                             "supported")
    norm, pre = tok.get("normalizer"), tok.get("pre_tokenizer") or {}
    flags, prefix, pre_id = 0, PREFIX_NONE, PRE_NONE
    pre_types = json.dumps(pre)
    if '"ByteLevel"' in pre_types:
        kind, pre_id = TOK_BYTE_BPE, _byte_level_pre(pre)
        if norm and norm.get("type") == "NFC":
            flags |= FLAG_NFC
        elif norm:
            raise TokenizerError(f"unsupported normalizer {json.dumps(norm)[:200]}")
    else:
        kind = TOK_SPM
        legacy_norm = [{"type": "Prepend", "prepend": "\u2581"},
                       {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
        if (norm and norm.get("type") == "Sequence" and norm.get("normalizers") == legacy_norm
                and not pre):
            prefix = PREFIX_ALL
        elif (norm is None and pre.get("type") == "Metaspace"
              and pre.get("replacement") == "\u2581" and not pre.get("split", False)):
            default_scheme = "always" if pre.get("add_prefix_space", True) else "never"
            scheme = pre.get("prepend_scheme", default_scheme)
            prefix = {"always": PREFIX_ALWAYS, "first": PREFIX_FIRST, "never": PREFIX_NONE}[scheme]
        else:
            raise TokenizerError(f"unsupported SentencePiece-style normalizer/pre_tokenizer: "
                                 f"{json.dumps(norm)[:150]} / {json.dumps(pre)[:150]}")
    if model.get("ignore_merges"):
        flags |= FLAG_IGNORE_MERGES
    vocab = dict(model["vocab"])
    added = tok.get("added_tokens", [])
    for a in added:
        if a.get("single_word"):
            raise TokenizerError(f"added token {a['content']!r} uses single_word, "
                                 "which is not supported")
    n = max([*vocab.values(), *(a["id"] for a in added)]) + 1
    tokens = [(b"", 0.0, T_UNUSED)] * n
    for text, i in vocab.items():
        if kind == TOK_BYTE_BPE:
            tokens[i] = (unmap_bytes(text), 0.0, T_NORMAL)
        else:
            byte = model.get("byte_fallback") and BYTE_TOKEN.fullmatch(text)
            tokens[i] = (text.encode("utf-8"), -float(i), T_BYTE if byte else T_NORMAL)
    for a in added:
        token_type = T_CONTROL if a.get("special") else T_USER_DEFINED
        # the whitespace HF's AddedVocabulary absorbs into the token, left and right
        token_type |= TYPE_LSTRIP if a.get("lstrip") else 0
        token_type |= TYPE_RSTRIP if a.get("rstrip") else 0
        tokens[a["id"]] = (a["content"].encode("utf-8"), 0.0, token_type)
    unk = model.get("unk_token")
    if unk is not None and unk in vocab:
        tokens[vocab[unk]] = (tokens[vocab[unk]][0], 0.0, T_UNKNOWN)
    merges = []
    for rank, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ") if isinstance(m, str) else m
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise TokenizerError(f"merge {a!r} {b!r} names a token that is not in the vocabulary")
        merges.append((vocab[a], vocab[b], vocab[a + b], rank))

    names = {a["content"]: a["id"] for a in added}
    names.update({k: v for k, v in vocab.items() if k not in names})
    bos = token_ids(_special_name(config, "bos_token"), names)
    eos = token_ids(_special_name(config, "eos_token"), names)
    # The post-processor says whether HF prepends BOS (Llama: "<s>", Llama 3: "<|begin_of_text|>").
    post = tok.get("post_processor") or {}
    procs = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    templates = (p.get("single") for p in procs if p.get("type") == "TemplateProcessing")
    single = next(templates, None) or []
    first = single[0].get("SpecialToken", {}).get("id") if single else None
    add_bos = config.get("add_bos_token", first is not None)
    if first is not None and bos < 0:
        bos = names.get(first, -1)
    if add_bos and bos >= 0:
        flags |= FLAG_ADD_BOS
    chat = chat_template_id(config.get("chat_template"))
    return pack_tokenizer_section(kind, pre_id, prefix, flags, tokens, merges, bos, eos,
                                  eot_id(chat, names, eos), token_ids(unk, names), chat)


def tokenizer_section_from_hf(model_dir):
    """tokenizer.json (preferred) or tokenizer.model from a HF model directory, or None."""
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    config = json.load(open(cfg_path, encoding="utf-8")) if os.path.exists(cfg_path) else {}
    tj, tm = os.path.join(model_dir, "tokenizer.json"), os.path.join(model_dir, "tokenizer.model")
    if os.path.exists(tj):
        return tokenizer_section_from_json(json.load(open(tj, encoding="utf-8")), config)
    if os.path.exists(tm):
        return tokenizer_section_from_spm(tm, config)
    return None


# --- GGUF metadata ------------------------------------------------------------------------

def _gguf_value(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_pre(name):
    """(pre-tokenizer, flags) of a tokenizer.ggml.pre name; refuses a name whose split
    tokenizer.c does not implement."""
    if name not in GGUF_PRE:
        raise TokenizerError(
            f"GGUF pre-tokenizer {name!r} is refused: tokenizer.c implements only the GPT-2, "
            f"Llama 3, Qwen2 and SmolLM splits, and {name!r} is not a name of one of them (any "
            f"other split, e.g. deepseek-llm, falcon, gpt-4o, tekken, bloom, would give other "
            f"ids). Accepted: {' '.join(GGUF_PRE)}")
    return GGUF_PRE[name]


def tokenizer_section_from_gguf(reader):
    """tokenizer.ggml.* metadata of an open gguf.GGUFReader, or None if it has none."""
    kind = _gguf_value(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    texts = _gguf_value(reader, "tokenizer.ggml.tokens")
    types = _gguf_value(reader, "tokenizer.ggml.token_type") or [T_NORMAL] * len(texts)
    bos = _gguf_value(reader, "tokenizer.ggml.bos_token_id", -1)
    eos = _gguf_value(reader, "tokenizer.ggml.eos_token_id", -1)
    unk = _gguf_value(reader, "tokenizer.ggml.unknown_token_id", -1)
    chat = chat_template_id(_gguf_value(reader, "tokenizer.chat_template"))
    names = {t: i for i, t in reversed(list(enumerate(texts)))}
    eot = _gguf_value(reader, "tokenizer.ggml.eot_token_id", eot_id(chat, names, eos))
    if kind == "llama":
        scores = _gguf_value(reader, "tokenizer.ggml.scores") or [0.0] * len(texts)
        tokens = [(t.encode("utf-8"), float(s), int(ty)) for t, s, ty in zip(texts, scores, types)]
        add_prefix = _gguf_value(reader, "tokenizer.ggml.add_space_prefix", True)
        prefix = PREFIX_ALL if add_prefix else PREFIX_NONE
        add_bos = _gguf_value(reader, "tokenizer.ggml.add_bos_token", True)
        flags = FLAG_ADD_BOS if add_bos and bos >= 0 else 0
        return pack_tokenizer_section(TOK_SPM, PRE_NONE, prefix, flags, tokens, spm_merges(tokens),
                                      bos, eos, eot, unk, chat)
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported "
                             "(only llama and gpt2)")
    pre, flags = gguf_pre(_gguf_value(reader, "tokenizer.ggml.pre", "default"))
    if _gguf_value(reader, "tokenizer.ggml.add_bos_token", False) and bos >= 0:
        flags |= FLAG_ADD_BOS
    tokens = []
    for t, ty in zip(texts, types):
        ty = int(ty)
        spelled = unmap_bytes(t) if ty in (T_NORMAL, T_UNUSED, T_BYTE) else t.encode("utf-8")
        tokens.append((spelled, 0.0, ty))
    merges = []
    for rank, m in enumerate(_gguf_value(reader, "tokenizer.ggml.merges") or []):
        a, b = m.split(" ")
        if a not in names or b not in names or a + b not in names:
            raise TokenizerError(f"GGUF merge {m!r} names a token that is not in the vocabulary")
        merges.append((names[a], names[b], names[a + b], rank))
    return pack_tokenizer_section(TOK_BYTE_BPE, pre, PREFIX_NONE, flags, tokens, merges, bos, eos,
                                  eot, unk, chat)


def write_tokenizer_only(section, path, arch="tokenizer"):
    """A file with no layers and no tensors: FileHeader, then the tokenizer section at 128.
    run.c's tokenize mode reads it; loading it as a model fails (n_layers = 0)."""
    vocab = struct.unpack_from("<I", section, 24)[0]
    header = {name: 0 for name, _ in HEADER_FIELDS}
    header.update({"magic": LR_MAGIC, "version": LR_VERSION, "header_size": HEADER.size,
                   "vocab_size": vocab,
                   "norm_eps": 0.0, "arch": arch, "tensor_table_offset": HEADER.size,
                   "tokenizer_offset": HEADER.size, "tokenizer_size": len(section),
                   "file_size": HEADER.size + len(section)})
    write_atomically(path, lambda f: f.write(pack(HEADER, HEADER_FIELDS, header) + section))


def read_tokenizer(source):
    """The tokenizer section of an HF directory or a GGUF file, or None if it has no tokenizer."""
    if os.path.isdir(source):
        return tokenizer_section_from_hf(source)
    return tokenizer_section_from_gguf(open_gguf(source))


def input_files(source):
    """Every file export.py may read from source (a GGUF file, or an HF directory's config,
    tokenizer files, index and shards) that exists."""
    if not os.path.isdir(source):
        return [source]
    names = ["config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "model.safetensors", "model.safetensors.index.json"]
    paths = [os.path.join(source, name) for name in names]
    try:
        paths += safetensors_files(source)
    except (ExportError, OSError, ValueError):
        pass  # a missing or broken index: read_hf reports it, with nothing written
    return [p for p in paths if os.path.exists(p)]


def check_output(source, out):
    """Refuse an OUT that is one of the files the export reads: renaming the finished file over
    it would destroy the source. Matched by device and inode (hard links, symlinks and other
    spellings of a path included) and by resolved path. (The temporary written first is a new
    file: see write_atomically.)"""
    if os.path.isdir(out):
        raise ExportError(f"{out} is a directory; give the path of the model file to write")
    inputs = {}
    for path in input_files(source):
        st = os.stat(path)
        inputs[(st.st_dev, st.st_ino)] = path
        inputs[os.path.realpath(path)] = path
    try:
        st = os.stat(out)
        same = inputs.get((st.st_dev, st.st_ino))
    except OSError:  # it does not exist yet, so it is no input
        same = None
    same = same or inputs.get(os.path.realpath(out))
    if same:
        raise ExportError(f"the output {out} is the input {same}: writing it would destroy the "
                          "source; choose another output path")


def export(args):
    """Read args.source, write args.out; returns the summary to print."""
    if not os.path.exists(args.source):
        raise ExportError(f"{args.source}: no such file or directory")
    check_output(args.source, args.out)
    tokenizer = read_tokenizer(args.source)
    if args.tokenizer_only:
        if tokenizer is None:
            raise ExportError(f"{args.source}: no tokenizer.json, tokenizer.model or GGUF "
                              "tokenizer metadata")
        write_tokenizer_only(tokenizer, args.out)
        return (f"tokenizer: {struct.unpack_from('<I', tokenizer, 24)[0]} tokens, "
                f"{len(tokenizer) / 1e6:.1f} MB -> {args.out}")
    if os.path.isdir(args.source):
        header, layers, factors, source = read_hf(args.source)
    elif os.path.isfile(args.source):
        header, layers, factors, source = read_gguf(args.source)
    else:
        raise ExportError(f"{args.source}: not a directory or a regular file")
    check_config(header)
    check_layers(header, layers)
    check_factor_lists(factors)
    n_tokens = struct.unpack_from("<I", tokenizer, 24)[0] if tokenizer else 0
    if tokenizer is None:
        print(f"note: {args.source} has no tokenizer; the model file will take token ids only",
              file=sys.stderr)
    elif n_tokens > header["vocab_size"]:
        raise ExportError(f"the tokenizer has {n_tokens} tokens, more than the model's vocab_size "
                          f"{header['vocab_size']}")
    plan = plan_tensors(header, factors, source, args.dtype)
    size = write_model(args.out, header, layers, plan, tokenizer or b"")
    return summary(header, layers, plan, args, size)


def main():
    ap = argparse.ArgumentParser(
        description="Export a Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3, Phi-3; "
                    "safetensors) or a llama-architecture GGUF file to a longrun model file.",
        epilog="example: python export.py ./SmolLM2-135M-Instruct model.bin --dtype q8_0")
    ap.add_argument("source",
                    help="HF model directory (config.json + *.safetensors) or a .gguf file")
    ap.add_argument("out", help="output model file (written as OUT.tmp, then renamed); never one "
                                "of the files it reads")
    ap.add_argument("--dtype", choices=list(DTYPES), default="q8_0",
                    help="storage type of the weight matrices (default: q8_0, int8 with one f32 "
                         "scale per 32 values, ~4x smaller than f32; f32 is the exact reference). "
                         "Norms and biases are always f32.")
    ap.add_argument("--tokenizer-only", action="store_true",
                    help="write only the tokenizer (for ./run FILE -m tokenize), from "
                         "tokenizer.json / tokenizer.model or the GGUF metadata")
    args = ap.parse_args()
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        print(export(args))
    except Interrupted as e:  # on_signal has removed OUT.tmp
        print(f"error: interrupted by {signal.Signals(e.args[0]).name}; {args.out} not written",
              file=sys.stderr)
        sys.exit(128 + e.args[0])
    except (ExportError, OSError) as e:  # OSError names its own file
        sys.exit(f"error: {e}")
    except (ValueError, KeyError) as e:  # a malformed config.json, index or GGUF file
        sys.exit(f"error: {args.source}: cannot read it ({type(e).__name__}: {e})")
    except Exception as e:  # anything else: still one line, never a traceback
        sys.exit(f"error: {args.source}: cannot export it ({type(e).__name__}: {shown(str(e))})")


def summary(h, layers, plan, args, size):
    """Three lines on what was written."""
    params = sum(math.prod(shape) for _, shape, _, _ in plan)
    rope = next(k for k, v in ROPE_TYPES.items() if v == layers[0]["rope_type"])
    sliding = [lc["window"] for lc in layers if lc["attn_kind"] == ATTN_SLIDING]
    return "\n".join([
        f"{h['arch']}: {h['n_layers']} layers, dim {h['dim']}, {h['n_heads']} heads / "
        f"{h['n_kv_heads']} kv heads, head_dim {h['head_dim']}, vocab {h['vocab_size']}"
        + (", tied embeddings" if h["tied_embeddings"] else ""),
        f"RoPE {rope}, theta {layers[0]['rope_theta']:g}; "
        + (f"{len(sliding)} sliding layers (window {max(sliding)})" if sliding
           else "full attention"),
        f"{params / 1e6:.1f}M parameters, {args.dtype}, {size / 1e6:.1f} MB -> {args.out}"])

if __name__ == "__main__":
    main()
