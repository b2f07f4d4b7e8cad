"""A header-indexed reader of one safetensors file (positioned reads, no long-lived memory map)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ...config.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """Header-indexed reader of one safetensors file; validates offsets against the file size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as err:
            raise CheckpointError(f"{self.path}: unreadable safetensors file ({err}); is it truncated?") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = header
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if self._start + end > size or entry["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} lies past the end of the file; is it truncated?")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self._start + begin)
            fh.readinto(memoryview(out.numpy()))
        return out.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def iter_chunks(self, name: str, chunk_bytes: int):
        entry = self._entries[name]
        dtype = DTYPES[entry["dtype"]]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        begin, end = entry["data_offsets"]
        total = (end - begin) // itemsize
        step = max(1, chunk_bytes // itemsize)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self._start + begin)
            for start in range(0, total, step):
                n = min(step, total - start)
                buf = torch.empty(n * itemsize, dtype=torch.uint8)
                if fh.readinto(memoryview(buf.numpy())) != n * itemsize:
                    raise CheckpointError(f"{self.path}: short read for {name}; is the file truncated?")
                yield start, buf.view(dtype)

    def location(self, name: str) -> tuple[Path, int, int]:
        begin, end = self._entries[name]["data_offsets"]
        return self.path, self._start + begin, end - begin

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        entry = self._entries[name]
        if DTYPES[entry["dtype"]] != out.dtype or tuple(entry["shape"]) != tuple(out.shape):
            return False
        begin, end = entry["data_offsets"]
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self._start + begin)
            view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
            if fh.readinto(view) != end - begin:
                raise CheckpointError(f"{self.path}: short read for {name}; is the file truncated?")
        return True
