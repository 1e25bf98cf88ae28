#!/usr/bin/python3
"""Reading and writing safetensors files for the PyTorch reference scripts, without the `safetensors`
package (Debian has none). The same format and the same checks as the engine's core/safetensors.cpp:

    8 bytes    little-endian uint64 N, the header length
    N bytes    UTF-8 JSON: {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
               "__metadata__": {str: str}}  (the metadata is optional; offsets count from the data section)
    the rest   the data section: every tensor's bytes, little-endian and row-major, covering it exactly

Dtypes: F64, F32, BF16, F16, I64, I32, U8, BOOL. load() and save() need torch; read_raw() needs only the
standard library. A file that breaks a rule of the format is a ValueError naming the file and the problem.

Run as a script, it checks itself (a round trip of every dtype, and a few damaged files). Given a path, it
also loads that file and lists its tensors; given a second path, it writes what it loaded there together
with a BF16, an I64 and a U8 tensor, which tests/test_safetensors.cpp reads back.
"""
import json
import os
import struct
import sys

if sys.byteorder != "little":
    raise ImportError("safetensors_io copies tensor bytes as they are and needs a little-endian machine")

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
DTYPE_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def torch_dtypes():
    """The torch dtype of each safetensors dtype name."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
            "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def _is_count(value):
    """A JSON integer that fits an int64 and is not negative (true and false are not counts)."""
    return type(value) is int and 0 <= value < 2**63


def _parse_header(text, path):
    """The header's JSON, rejecting a key repeated within one object and the non-JSON NaN / Infinity."""

    def without_repeats(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"{path}: the header repeats the key {key!r} within one object")
            obj[key] = value
        return obj

    def reject_constant(name):
        raise ValueError(f"{path}: the header is not valid JSON ({name} is not a JSON value)")

    try:
        return json.loads(text, object_pairs_hook=without_repeats, parse_constant=reject_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the header is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: the header nests too deeply") from None


def _parse_entry(name, info, data_bytes, path):
    """(name, dtype, shape, begin, end) of one tensor of the header, checked on its own."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: its entry is {type(info).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise ValueError(f'{where}: its entry has no "{key}"')
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise ValueError(f'{where}: "dtype" is {dtype!r}, not a string')
    if dtype not in DTYPE_SIZES:
        raise ValueError(f'{where}: unknown or unsupported dtype "{dtype}" (supported: {", ".join(DTYPE_SIZES)})')
    if not isinstance(shape, list):
        raise ValueError(f'{where}: "shape" is {shape!r}, not an array')
    for d in shape:
        if not _is_count(d):
            raise ValueError(f"{where}: the shape dimension {d!r} is not a non-negative integer")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise ValueError(f'{where}: "data_offsets" is {offsets!r}, not [begin, end] with two non-negative integers')
    begin, end = offsets
    if begin > end:
        raise ValueError(f'{where}: "data_offsets" [{begin}, {end}] begins after it ends')
    if end > data_bytes:
        raise ValueError(f"{where}: its data ends at byte {end}, past the end of the data section ({data_bytes} bytes)")
    needed = DTYPE_SIZES[dtype]
    for d in shape:
        needed *= d
    if end - begin != needed:
        raise ValueError(f'{where}: "data_offsets" [{begin}, {end}] hold {end - begin} bytes, but shape '
                         f"{tuple(shape)} of {dtype} needs {needed}")
    return name, dtype, tuple(shape), begin, end


def _parse_metadata(value, path):
    if not isinstance(value, dict):
        raise ValueError(f'{path}: "__metadata__" is {type(value).__name__}, not an object of strings')
    for key, text in value.items():
        if not isinstance(text, str):
            raise ValueError(f'{path}: "__metadata__" maps {key!r} to {text!r}, not a string')
    return dict(value)


def read_raw(path):
    """Reads and checks a file without torch: ([(name, dtype, shape, bytes)] in data-offset order, metadata)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file ({len(data)} bytes; "
                         "the header length alone takes 8)")
    (header_bytes,) = struct.unpack("<Q", data[:8])
    if header_bytes > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: the header length {header_bytes} exceeds the 100 MB limit "
                         "(not a safetensors file, or a damaged one)")
    if header_bytes > len(data) - 8:
        raise ValueError(f"{path}: the header length {header_bytes} runs past the end of the file ({len(data)} bytes)")
    try:
        text = data[8:8 + header_bytes].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the header is not valid JSON (not UTF-8: {e})") from None
    header = _parse_header(text, path)
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is {type(header).__name__}, not a JSON object")

    data_start, data_bytes = 8 + header_bytes, len(data) - 8 - header_bytes
    metadata, placed = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            metadata = _parse_metadata(info, path)
        else:
            placed.append(_parse_entry(name, info, data_bytes, path))

    # The tensors must cover the data section exactly: no overlaps, no holes, nothing left at the end.
    placed.sort(key=lambda p: (p[3], p[4]))  # stable: empty tensors at one offset keep the header's order
    covered, previous = 0, None
    for name, _, _, begin, end in placed:
        if begin < covered:
            raise ValueError(f"{path}: tensors {previous!r} and {name!r} overlap in the data section "
                             f"(bytes {begin} to {covered})")
        if begin > covered:
            raise ValueError(f"{path}: bytes {covered} to {begin} of the data section belong to no tensor "
                             "(the format allows no holes)")
        covered, previous = end, name
    if covered != data_bytes:
        raise ValueError(f"{path}: the last {data_bytes - covered} of the {data_bytes} bytes of the data section "
                         "belong to no tensor (unused bytes at the end)")
    entries = [(name, dtype, shape, data[data_start + begin:data_start + end])
               for name, dtype, shape, begin, end in placed]
    return entries, metadata


def load(path):
    """(dict name -> CPU torch.Tensor in data-offset order, metadata dict)."""
    import torch

    dtypes = torch_dtypes()
    entries, metadata = read_raw(path)
    tensors = {}
    for name, dtype, shape, raw in entries:
        if raw:
            tensors[name] = torch.frombuffer(bytearray(raw), dtype=dtypes[dtype]).reshape(shape)
        else:  # frombuffer refuses an empty buffer
            tensors[name] = torch.empty(shape, dtype=dtypes[dtype])
    return tensors, metadata


def save(path, tensors, metadata=None):
    """Writes dict name -> torch.Tensor (any device) in its order, the header padded with spaces so that the
    data section starts 8-byte aligned. Written to a temporary file, synced and renamed over `path`, so `path`
    never holds a partly written file."""
    import torch

    names_by_dtype = {dtype: name for name, dtype in torch_dtypes().items()}
    header = {}
    if metadata:
        for key, text in metadata.items():
            if not (isinstance(key, str) and isinstance(text, str)):
                raise ValueError(f"{path}: metadata must map strings to strings, not {key!r} to {text!r}")
        header["__metadata__"] = dict(metadata)
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path}: tensor names must be non-empty strings, not {name!r}")
        if name == "__metadata__":
            raise ValueError(f'{path}: "__metadata__" names the metadata and cannot name a tensor')
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype not in names_by_dtype:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors_io does not write "
                             f"(supported: {', '.join(str(d) for d in names_by_dtype)})")
        blob = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names_by_dtype[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)

    temp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for blob in blobs:
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def _require(condition, what):
    if not condition:
        raise AssertionError(f"self-check failed: {what}")


def _self_check():
    """Round-trips every dtype (a 0-dim and an empty tensor among them) and rejects a few damaged files."""
    import tempfile

    import torch

    tensors = {
        "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
        "f64": torch.tensor(2.5, dtype=torch.float64),
        "bf16": torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16),
        "f16": torch.tensor([0.5, -65504.0], dtype=torch.float16),
        "i64": torch.tensor([-2**40, 7], dtype=torch.int64),
        "i32": torch.tensor([[1], [-2]], dtype=torch.int32),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "check.safetensors")
        save(path, tensors, {"format": "pt"})
        _require(os.listdir(folder) == ["check.safetensors"], "the temporary file is gone after save")
        with open(path, "rb") as f:
            _require(struct.unpack("<Q", f.read(8))[0] % 8 == 0, "the data section is 8-byte aligned")
        loaded, metadata = load(path)
        _require(list(loaded) == list(tensors), "the tensors come back in order")
        _require(metadata == {"format": "pt"}, "the metadata comes back")
        for name, tensor in tensors.items():
            _require(loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
                     and torch.equal(loaded[name], tensor), f"tensor {name} comes back equal")

        with open(path, "rb") as f:
            good = f.read()
        damaged = {"truncated": good[:-1], "too short": good[:5], "trailing": good + b"\0",
                   "header length": struct.pack("<Q", 10**9) + good[8:]}
        for what, data in damaged.items():
            with open(path, "wb") as f:
                f.write(data)
            try:
                read_raw(path)
            except ValueError:
                continue
            raise AssertionError(f"self-check failed: a {what} file is accepted")


def main(argv):
    if len(argv) > 3:
        sys.exit(f"usage: {argv[0]} [FILE [ECHO_FILE]]")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        print("torch is not installed: only the format of FILE is checked")
    else:
        _self_check()
        print("self-check passed")
    if len(argv) > 1:
        if torch is None:
            entries, metadata = read_raw(argv[1])
            listing = [(name, dtype, shape) for name, dtype, shape, _ in entries]
        else:
            tensors, metadata = load(argv[1])
            listing = [(name, str(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
        print(f"{argv[1]}: {len(listing)} tensors, metadata {metadata}")
        for name, dtype, shape in listing:
            print(f"  {name}: {dtype} {shape}")
    if len(argv) > 2:
        if torch is None:
            sys.exit("writing ECHO_FILE needs torch")
        echo = dict(tensors)
        echo["py_bf16"] = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
        echo["py_i64"] = torch.tensor([[-3, 2**31 - 1], [5, -2**31]], dtype=torch.int64)
        echo["py_u8"] = torch.tensor([0, 255, 7], dtype=torch.uint8)
        save(argv[2], echo, {**metadata, "written_by": "safetensors_io.py"})
        print(f"wrote {argv[2]}")


if __name__ == "__main__":
    main(sys.argv)
