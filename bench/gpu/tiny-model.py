#!/usr/bin/env python3
"""Write a Llama GGUF with a real model's tokenizer, chat template and
vocabulary but tiny blocks (random Q8_0 weights), to measure what a decode
step costs apart from arithmetic: with DIM 64 a block's products are a few
thousand multiply-adds, so the step time of a LAYERS-block model is the
engine's per-step work plus LAYERS times the per-block fixed cost (kernel
launches on a GPU, thread hand-offs on a CPU). Comparing LAYERS 1 and 30 in
the same run separates the two.

Usage: tiny-model.py IN.gguf OUT.gguf LAYERS [DIM=64] [FF=128]

Needs numpy. IN is read for its metadata only (shape-model.py's reader).
"""
import importlib.util
import os
import struct
import sys

import numpy as np

_spec = importlib.util.spec_from_file_location(
    "shape_model", os.path.join(os.path.dirname(os.path.abspath(__file__)), "shape-model.py"))
sm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm)

HEADS, KV_HEADS = 4, 2
Q8_0, F32 = 8, 0


def read_metadata(path):
    r = sm.Reader(open(path, "rb").read())
    assert r.take("I") == 0x46554747, "not a GGUF file"
    version, _n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    kvs = []
    for _ in range(n_kv):
        key, t = r.string(), r.take("I")
        if t == 9:  # arrays keep their element type
            et, n = r.take("I"), r.take("Q")
            kvs.append((key, t, (et, [r.value(et) for _ in range(n)])))
        else:
            kvs.append((key, t, r.value(t)))
    return version, kvs


def q8_0(x):
    """ggml Q8_0 blocks of 32: an f16 scale, then 32 int8 quants."""
    b = x.reshape(-1, 32)
    d = np.abs(b).max(axis=1) / 127
    d[d == 0] = 1
    rec = np.zeros(len(b), dtype=[("d", "<f2"), ("q", "i1", 32)])
    rec["d"] = d.astype(np.float16)
    rec["q"] = np.round(b / d[:, None]).astype(np.int8)
    return rec.tobytes()


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    src, dst, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dim = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    ff = int(sys.argv[5]) if len(sys.argv) > 5 else 128
    assert dim % HEADS == 0 and dim % 32 == 0 and ff % 32 == 0, "DIM and FF must be multiples of 32"
    head_dim = dim // HEADS
    version, kvs = read_metadata(src)
    meta = dict((k, v) for k, _, v in kvs)
    vocab = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"][1])
    override = {
        "llama.block_count": layers, "llama.embedding_length": dim, "llama.feed_forward_length": ff,
        "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV_HEADS,
        "llama.rope.dimension_count": head_dim, "general.file_type": 7,
    }
    rng = np.random.default_rng(0)
    ones = lambda n: np.ones(n, np.float32).tobytes()
    weight = lambda rows, cols, scale: q8_0(rng.uniform(-scale, scale, rows * cols).astype(np.float32))
    # GGUF lists dimensions innermost first.
    tensors = [("token_embd.weight", [dim, vocab], Q8_0, weight(vocab, dim, 1.0)),
               ("output_norm.weight", [dim], F32, ones(dim))]
    for i in range(layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", [dim], F32, ones(dim)),
            (f"blk.{i}.ffn_norm.weight", [dim], F32, ones(dim)),
            (f"blk.{i}.attn_q.weight", [dim, dim], Q8_0, weight(dim, dim, 0.2)),
            (f"blk.{i}.attn_k.weight", [dim, KV_HEADS * head_dim], Q8_0, weight(KV_HEADS * head_dim, dim, 0.2)),
            (f"blk.{i}.attn_v.weight", [dim, KV_HEADS * head_dim], Q8_0, weight(KV_HEADS * head_dim, dim, 0.2)),
            (f"blk.{i}.attn_output.weight", [dim, dim], Q8_0, weight(dim, dim, 0.2)),
            (f"blk.{i}.ffn_gate.weight", [dim, ff], Q8_0, weight(ff, dim, 0.2)),
            (f"blk.{i}.ffn_up.weight", [dim, ff], Q8_0, weight(ff, dim, 0.2)),
            (f"blk.{i}.ffn_down.weight", [ff, dim], Q8_0, weight(dim, ff, 0.2)),
        ]
    out = bytearray()
    put = lambda fmt, *v: out.extend(struct.pack("<" + fmt, *v))

    def put_str(s):
        b = s.encode()
        put("Q", len(b))
        out.extend(b)

    def put_value(t, v):
        if t == 8:
            put_str(v)
        elif t == 9:
            et, items = v
            put("I", et)
            put("Q", len(items))
            for item in items:
                put_value(et, item)
        else:
            put(sm.SCALAR[t], v)

    align = lambda n: (n + 31) // 32 * 32
    put("I", 0x46554747)
    put("I", version)
    put("Q", len(tensors))
    put("Q", len(kvs))
    for key, t, v in kvs:
        put_str(key)
        put("I", t)
        put_value(t, override.get(key, v))
    offset = 0
    for name, dims, ggml_type, data in tensors:
        put_str(name)
        put("I", len(dims))
        for d in dims:
            put("Q", d)
        put("I", ggml_type)
        put("Q", offset)
        offset += align(len(data))
    out.extend(b"\0" * (align(len(out)) - len(out)))
    for _, _, _, data in tensors:
        out.extend(data)
        out.extend(b"\0" * (align(len(data)) - len(data)))
    with open(dst, "wb") as f:
        f.write(out)
    print(f"{dst}: {layers} blocks of dim {dim} (ff {ff}), vocabulary {vocab}, {len(out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
