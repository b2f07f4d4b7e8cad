"""A header-indexed reader of one safetensors file (positioned reads, no long-lived memory map).

The header is validated as the ``safetensors`` library validates it, so that a file it would refuse
is refused here too, with one line naming the file and the tensor (:class:`SafetensorsFile`):

* the 8-byte header length is at most 100 MB (the library's cap) and fits in the file;
* the header is a UTF-8 JSON object without repeated keys; ``__metadata__`` maps text to text;
* every tensor has a known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets``
  of two non-negative integers, begin ≤ end;
* shape × dtype size = end − begin;
* the tensors cover the data section exactly: no overlap, no gap, nothing past the end and
  nothing after the last tensor.

Reads check that every byte asked for arrived (a file shortened after opening is reported).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from ...config.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}
#: The largest header the safetensors library reads (``MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


def _is_count(value) -> bool:
    """A JSON non-negative integer (booleans and floats are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Repeated(ValueError):
    """A JSON object names one key twice."""


def _no_repeats(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = next(k for k in keys if keys.count(k) > 1)
        raise _Repeated(f"the header names {repeated!r} twice")
    return dict(pairs)


def _surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class SafetensorsFile:
    """Header-indexed reader of one safetensors file, validated on opening (see the module's rules).

    Args:
        path: the ``.safetensors`` file.

    Raises:
        CheckpointError: a header the safetensors library would refuse, or a file that cannot be read;
            one line naming the file and, where one is at fault, the tensor.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    self._fail(f"only {len(head)} bytes, not even the 8-byte header length; is it truncated?")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    self._fail(f"header length {n} is above the safetensors limit of {MAX_HEADER_BYTES} bytes")
                if n > size - 8:
                    self._fail(f"header length {n} runs past the end of the file ({size} bytes); is it truncated?")
                raw = fh.read(n)
        except OSError as err:
            self._fail(f"cannot be read ({err.strerror or type(err).__name__})")
        if len(raw) != n:
            self._fail("short read of the header; is the file truncated?")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats, parse_constant=_no_constant)
        except UnicodeDecodeError:
            self._fail("header is not UTF-8 text")
        except _Repeated as err:
            self._fail(str(err))
        except (ValueError, RecursionError) as err:
            self._fail(f"header is not valid JSON ({str(err).splitlines()[0][:120]})")
        if not isinstance(header, dict):
            self._fail(f"header is a JSON {type(header).__name__}, not an object of tensors")
        metadata = header.pop(METADATA_KEY, None)
        if metadata is not None and (not isinstance(metadata, dict)
                                     or not all(isinstance(v, str) for v in metadata.values())):
            self._fail(f"{METADATA_KEY} is not a mapping of text to text")
        if metadata and any(_surrogates(k) or _surrogates(v) for k, v in metadata.items()):
            self._fail(f"{METADATA_KEY} holds text that is not valid Unicode")
        self.metadata = metadata or {}
        self._start = 8 + n
        self._entries = {name: self._entry(name, entry) for name, entry in header.items()}
        self._check_layout(size - 8 - n)

    # -- validation ---------------------------------------------------------------------------------
    def _fail(self, what: str, name: str | None = None):
        tensor = f"tensor {name!r}: " if name is not None else ""
        raise CheckpointError(f"{self.path}: {tensor}{what}") from None

    def _entry(self, name: str, entry) -> dict:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            self._fail("its name is not valid Unicode (a lone surrogate escape)", name)
        if not isinstance(entry, dict):
            self._fail(f"its header entry is a JSON {type(entry).__name__}, not an object", name)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                self._fail(f"missing {key}", name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            self._fail(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})", name)
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            self._fail(f"shape {json.dumps(shape)[:80]} is not a list of non-negative integers", name)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            self._fail(f"data_offsets {json.dumps(offsets)[:80]} is not two non-negative integers", name)
        begin, end = offsets
        if begin > end:
            self._fail(f"data_offsets [{begin}, {end}] begin after they end", name)
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if nbytes != end - begin:
            self._fail(f"shape {shape} of {dtype} takes {nbytes} bytes, but data_offsets [{begin}, {end}] hold {end - begin}", name)
        return {"dtype": dtype, "shape": tuple(shape), "data_offsets": (begin, end)}

    def _check_layout(self, data_bytes: int) -> None:
        """The tensors cover the data section exactly: no overlap, no gap, nothing past its end."""
        order = sorted(self._entries.items(), key=lambda item: item[1]["data_offsets"])
        expected, previous = 0, None
        for name, entry in order:
            begin, end = entry["data_offsets"]
            if begin < expected:
                self._fail(f"its bytes [{begin}, {end}] overlap those of tensor {previous!r}", name)
            if begin > expected:
                self._fail(f"starts at byte {begin} of the data, leaving a gap of {begin - expected} bytes "
                           "no tensor describes", name)
            expected, previous = end, name
        if expected > data_bytes:
            self._fail(f"lies past the end of the file (the data section has {data_bytes} bytes, the header "
                       f"describes {expected}); is it truncated?", previous)
        if expected < data_bytes:
            self._fail(f"{data_bytes - expected} bytes after the last tensor are not described by the header")

    # -- access -------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name]["shape"]

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def _read(self, name: str, offset: int, view, fh=None) -> None:
        """Fill ``view`` from ``offset``: every byte, or a one-line error (a file shortened since opening)."""
        if fh is None:
            with open(self.path, "rb", buffering=0) as own:
                return self._read(name, offset, view, own)
        fh.seek(offset)
        done, want = 0, len(view)
        while done < want:
            got = fh.readinto(view[done:])
            if not got:
                self._fail(f"short read ({done} of {want} bytes); is the file truncated?", name)
            done += got

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        out = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            self._read(name, self._start + begin, memoryview(out.numpy()))
        return out.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def iter_chunks(self, name: str, chunk_bytes: int):
        entry = self._entries[name]
        dtype = DTYPES[entry["dtype"]]
        itemsize = ITEMSIZE[entry["dtype"]]
        begin, end = entry["data_offsets"]
        total = (end - begin) // itemsize
        step = max(1, chunk_bytes // itemsize)
        with open(self.path, "rb", buffering=0) as fh:
            for start in range(0, total, step):
                n = min(step, total - start)
                buf = torch.empty(n * itemsize, dtype=torch.uint8)
                self._read(name, self._start + begin + start * itemsize, memoryview(buf.numpy()), fh)
                yield start, buf.view(dtype)

    def location(self, name: str) -> tuple[Path, int, int]:
        begin, end = self._entries[name]["data_offsets"]
        return self.path, self._start + begin, end - begin

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        entry = self._entries[name]
        if DTYPES[entry["dtype"]] != out.dtype or tuple(entry["shape"]) != tuple(out.shape):
            return False
        begin, end = entry["data_offsets"]
        if end > begin:
            self._read(name, self._start + begin, memoryview(out.view(-1).view(torch.uint8).numpy()))
        return True
