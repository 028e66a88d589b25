#!/usr/bin/env python3
"""Write a GGUF with the same metadata (tokenizer, chat template), tensor
names, shapes and types as a real one, whose quantized tensors repeat their
first 1/PERIOD so the file compresses to a few MB.

Speed on a GPU does not depend on weight values, so the GPU run measures this
file instead of carrying the real 145 MB model (the carrying limit is 64 MiB
per call). Values stay real blocks of the model (valid scales, no NaN); norm
vectors (F32/F16) are copied whole.

Usage: shape-model.py IN.gguf OUT.gguf [PERIOD=32]
"""
import struct
import sys

# ggml type -> (elements per block, bytes per block)
BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
    8: (32, 34), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 30: (1, 2),
}
SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0]

    def string(self):
        n = self.take("Q")
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        return s.decode("utf-8", "replace")

    def value(self, t):
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.take("I"), self.take("Q")
            return [self.value(et) for _ in range(n)]
        return self.take(SCALAR[t])


def main():
    src, dst = sys.argv[1], sys.argv[2]
    period = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    data = open(src, "rb").read()
    r = Reader(data)
    assert r.take("I") == 0x46554747, "not a GGUF file"
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    assert version >= 2, f"GGUF v{version} is not supported"
    alignment = 32
    for _ in range(n_kv):
        key, t = r.string(), r.take("I")
        v = r.value(t)
        if key == "general.alignment":
            alignment = v
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("Q") for _ in range(r.take("I"))]
        ggml_type, offset = r.take("I"), r.take("Q")
        tensors.append((name, dims, ggml_type, offset))
    start = (r.pos + alignment - 1) // alignment * alignment
    out = bytearray(data[:start])
    body = bytearray(data[start:])
    for name, dims, ggml_type, offset in tensors:
        per_block, block_bytes = BLOCKS[ggml_type]
        n = 1
        for d in dims:
            n *= d
        size = n // per_block * block_bytes
        if per_block == 1:
            continue  # norms and other float vectors: kept
        blocks = size // block_bytes
        head = max(1, blocks // period) * block_bytes
        chunk = bytes(body[offset:offset + head])
        filled = (chunk * (size // head + 1))[:size]
        body[offset:offset + size] = filled
    out += body
    open(dst, "wb").write(out)
    print(f"{dst}: {len(tensors)} tensors, {len(out) / 1e6:.1f} MB, period 1/{period}")


if __name__ == "__main__":
    main()
