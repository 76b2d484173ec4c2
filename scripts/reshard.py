#!/usr/bin/env python3
"""Splits every `NAME.safetensors` of a checkpoint folder into N shard files
`NAME-0000k-of-0000N.safetensors` (whole tensors, about equal bytes each), as
a data-parallel run's ranks or Hugging Face's sharded saves write them; other
files are copied. Standard library only: tensor bytes are copied verbatim.

Usage: scripts/reshard.py SRC_DIR DST_DIR N
"""

import json
import shutil
import struct
import sys
from pathlib import Path


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def write_shard(src, data_start, path, names, header):
    out_header = {}
    offset = 0
    for name in names:
        begin, end = header[name]["data_offsets"]
        entry = dict(header[name])
        entry["data_offsets"] = [offset, offset + end - begin]
        out_header[name] = entry
        offset += end - begin
    blob = json.dumps(out_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(src, "rb") as f, open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name in names:
            begin, end = header[name]["data_offsets"]
            f.seek(data_start + begin)
            left = end - begin
            while left:
                block = f.read(min(left, 64 << 20))
                out.write(block)
                left -= len(block)


def main():
    src, dst, shards = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.suffix != ".safetensors":
            shutil.copy(path, dst / path.name)
            continue
        header, data_start = read_header(path)
        header.pop("__metadata__", None)
        names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
        total = sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names)
        groups, current, size = [], [], 0
        for name in names:
            begin, end = header[name]["data_offsets"]
            current.append(name)
            size += end - begin
            if size >= total * (len(groups) + 1) / shards and len(groups) < shards - 1:
                groups.append(current)
                current = []
        groups.append(current)
        for k, group in enumerate(groups, 1):
            shard = dst / f"{path.stem}-{k:05d}-of-{len(groups):05d}.safetensors"
            write_shard(path, data_start, shard, group, header)


if __name__ == "__main__":
    main()
