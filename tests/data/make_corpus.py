#!/usr/bin/env python3
"""Writes the hostile and unusual safetensors corpus in tests/data/corpus/.

Each file is named `bad-<what>.safetensors` (ckptvc must refuse it with a
clear error and leave the store as it was) or `ok-<what>.safetensors` (legal:
it must round-trip byte for byte). tests/hostile.rs runs them all. Run
`python3 tests/data/make_corpus.py` to regenerate; the output is committed.
"""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def raw_header(header: bytes, data: bytes = b"", length=None) -> bytes:
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def st(entries: dict, data: bytes, pad=True) -> bytes:
    h = json.dumps(entries, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return raw_header(h, data)


def f32(n: int, seed: int = 1) -> bytes:
    return b"".join(struct.pack("<f", ((i * 7919 + seed) % 1000) / 997.0 - 0.5) for i in range(n))


def t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def corpus():
    c = {}
    c["bad-empty-file"] = b""
    c["bad-short-length-prefix"] = b"\x10\x00\x00"
    c["bad-header-beyond-file"] = raw_header(b'{"a":1}', length=4096)
    c["bad-header-length-2-63"] = raw_header(b"{}", length=1 << 63)
    c["bad-header-not-utf8"] = raw_header(b'{"\xff\xfe":1}   ')
    c["bad-header-not-json"] = raw_header(b"this is not json")
    c["bad-header-json-array"] = raw_header(b"[1,2,3]")
    c["bad-duplicate-names"] = raw_header(
        b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        f32(2),
    )
    c["bad-negative-shape"] = st({"x": t("F32", [-1], 0, 4)}, f32(1))
    c["bad-float-shape"] = st({"x": t("F32", [1.5], 0, 4)}, f32(1))
    c["bad-huge-shape"] = st({"x": t("F32", [2**62, 2**62], 0, 4)}, f32(1))
    c["bad-count-times-size-overflow"] = st({"x": t("F64", [2**61], 0, 8)}, f32(2))
    c["bad-shape-bytes-mismatch"] = st({"x": t("F32", [3], 0, 8)}, f32(2))
    c["bad-overlapping-offsets"] = st({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, f32(3))
    c["bad-gap-between-tensors"] = st({"a": t("F32", [1], 0, 4), "b": t("F32", [1], 8, 12)}, f32(3))
    c["bad-offsets-past-end"] = st({"a": t("F32", [4], 0, 16)}, f32(2))
    c["bad-trailing-bytes"] = st({"a": t("F32", [1], 0, 4)}, f32(2))
    c["bad-reversed-offsets"] = st({"a": t("F32", [0], 8, 4)}, f32(2))
    c["bad-unknown-dtype"] = st({"a": t("F31", [1], 0, 4)}, f32(1))
    c["bad-missing-dtype"] = st({"a": {"shape": [1], "data_offsets": [0, 4]}}, f32(1))
    c["bad-offsets-not-numbers"] = st({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, f32(1))
    c["bad-metadata-non-string"] = st({"__metadata__": {"epoch": 3}, "a": t("F32", [1], 0, 4)}, f32(1))
    c["bad-metadata-not-object"] = st({"__metadata__": [1, 2], "a": t("F32", [1], 0, 4)}, f32(1))
    c["bad-2gib-tensor-file-short"] = st({"a": t("F32", [600_000_000], 0, 2_400_000_000)}, f32(4))
    c["bad-tensor-entry-not-object"] = st({"a": 5}, b"")
    # Legal but unusual.
    c["ok-zero-d-tensor"] = st({"s": t("F32", [], 0, 4)}, f32(1))
    c["ok-empty-tensor"] = st({"e": t("F32", [0], 0, 0), "a": t("F32", [2], 0, 8)}, f32(2))
    c["ok-no-tensors"] = st({}, b"")
    c["ok-metadata-strings"] = st({"__metadata__": {"format": "pt", "note": "ünïcødé"}, "a": t("F32", [2], 0, 8)}, f32(2))
    c["ok-out-of-order-entries"] = st({"z": t("F32", [1], 0, 4), "a": t("F32", [2], 4, 12)}, f32(3))
    c["ok-unpadded-header"] = st({"a": t("F32", [3], 0, 12)}, f32(3), pad=False)
    c["ok-every-dtype"] = every_dtype()
    c["ok-non-ascii-tensor-names"] = st({"层.权重": t("F32", [2], 0, 8), "naïve w": t("F32", [1], 8, 12)}, f32(3))
    c["ok-large-weight-with-adam"] = with_adam()
    c["ok-20k-tiny-tensors"] = many_tiny(20_000)
    return c


def every_dtype():
    sizes = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
    entries, offset = {}, 0
    for name, size in sizes.items():
        entries[name.lower()] = t(name, [3], offset, offset + 3 * size)
        offset += 3 * size
    data = bytes((i * 37) % 251 for i in range(offset))
    data = bytearray(data)
    for i in range(offset):  # BOOL must be 0/1
        if i < 3:
            data[i] = i % 2
    return st(entries, bytes(data))


def with_adam():
    n = 8192
    return st({"w": t("F32", [64, 128], 0, 4 * n)}, f32(n, 3))


def many_tiny(count):
    entries = {f"t{i}": t("U8", [1], i, i + 1) for i in range(count)}
    return st(entries, bytes(i % 256 for i in range(count)))


def main():
    os.makedirs(OUT, exist_ok=True)
    for old in os.listdir(OUT):
        os.remove(os.path.join(OUT, old))
    for name, data in corpus().items():
        with open(os.path.join(OUT, name + ".safetensors"), "wb") as f:
            f.write(data)
    print(f"wrote {len(corpus())} files to {OUT}")


if __name__ == "__main__":
    main()
