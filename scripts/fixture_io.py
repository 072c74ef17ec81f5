"""Shared by the fixture generators: byte-reproducible safetensors files."""
import json
import os
import struct

from safetensors.torch import save_file


def save_stable(tensors, path, metadata):
    """save_file, then rewrite the header with sorted metadata keys.

    safetensors serialises ``__metadata__`` from a hash map, so its key order
    (and hence the file bytes) varies between runs; sorting it makes the
    committed fixtures byte-for-byte reproducible.
    """
    save_file(tensors, path, metadata=metadata)
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    new = {"__metadata__": dict(sorted(meta.items()))}
    new.update(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
    hbytes = json.dumps(new, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)) + hbytes + raw[8 + n:])
    os.chmod(path, 0o644)  # safetensors creates files 0600
