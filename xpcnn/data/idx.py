"""The IDX file format of MNIST and Fashion-MNIST (read, parse, encode, write) and the one
gunzip, size-guarded, that every compressed file goes through.

IDX: magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 sizes, then the data
in C order, big-endian.
"""

from __future__ import annotations

import gzip as gzip_lib
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import DatasetError, DTypeError, ShapeError
from ..fileio import atomic_write

#: IDX data-type codes and the big-endian NumPy dtype each one stores.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
GZIP_MAGIC = b"\x1f\x8b"

#: The most bytes a gzip-compressed IDX file may unpack to (MNIST's training images are 47 MB);
#: a guard against a decompression bomb posing as a dataset.
MAX_IDX_BYTES = 2 ** 30


def _known_codes() -> str:
    return ", ".join(f"0x{code:02X} {dtype.name}" for code, dtype in IDX_DTYPES.items())


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file.

    Returns a writable native-byte-order array whose shape is the header's dimensions,
    e.g. (10000, 28, 28) uint8 for images or (10000,) uint8 for labels.

    Raises:
        DatasetError: bad magic number, unknown dtype code, truncated header, or a data
            size that disagrees with the header (truncated or trailing bytes); the message
            names `source`.
    """
    if len(data) < 4:
        raise DatasetError(f"{source}: file has {len(data)} bytes, too short for the 4-byte IDX magic number")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if (zero0, zero1) != (0, 0):
        hint = " (this looks like gzip data: name the file *.gz)" if data[:2] == GZIP_MAGIC else ""
        raise DatasetError(
            f"{source}: not an IDX file: the magic number must start with bytes 0x00 0x00, "
            f"got 0x{zero0:02X} 0x{zero1:02X}{hint}"
        )
    if code not in IDX_DTYPES:
        raise DatasetError(f"{source}: unknown IDX data type code 0x{code:02X} (known: {_known_codes()})")
    if ndim == 0:
        raise DatasetError(f"{source}: IDX header declares 0 dimensions, expected at least 1")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DatasetError(
            f"{source}: file has {len(data)} bytes, too short for the {header_size}-byte header "
            f"of a {ndim}-dimensional IDX file"
        )
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return _idx_body(data, source, IDX_DTYPES[code], shape, header_size)


def _idx_body(data: bytes, source: str, dtype: np.dtype, shape: tuple[int, ...], header_size: int) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    expected = count * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        what = "image data" if len(shape) >= 3 else "label data" if len(shape) == 1 else "data"
        problem = "truncated" if actual < expected else f"{actual - expected} trailing bytes"
        dims = "x".join(str(size) for size in shape)
        raise DatasetError(
            f"{source}: expected {expected} bytes of {what} for {dims} {dtype.name} after the "
            f"{header_size}-byte header, file has {actual} ({problem})"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=header_size)
    return flat.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def read_idx_bytes(path: str | os.PathLike) -> bytes:
    """The decompressed bytes of an IDX file (``*.gz`` is gunzipped, anything else read as is).

    Raises:
        DatasetError: the file cannot be read, or a ``.gz`` file is not gzip or is corrupted.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file: {exc.strerror or exc}") from exc
    if path.suffix != ".gz":
        return raw
    return gunzip(raw, str(path), MAX_IDX_BYTES)


def gunzip(raw: bytes, source: str, max_bytes: int) -> bytes:
    """The decompressed bytes of gzip data `raw`, at most `max_bytes` of them: the one gunzip
    of xpcnn (datasets, downloads, and IDX files given to ``xpcnn predict``).

    Raises:
        DatasetError: naming `source`: not gzip data, corrupted or truncated data, or data that
            unpacks to more than `max_bytes` (a decompression-bomb guard).
    """
    if raw[:2] != GZIP_MAGIC:
        raise DatasetError(
            f"{source}: not a gzip file (starts with bytes {raw[:2].hex(' ') or 'nothing'}, "
            f"expected 1f 8b); if it is an uncompressed IDX file, drop the .gz suffix"
        )
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(raw, max_bytes + 1)
    except zlib.error as exc:
        raise DatasetError(f"{source}: corrupted gzip data ({exc})") from exc
    if len(data) > max_bytes:
        raise DatasetError(f"{source}: unpacks to more than {max_bytes / 2 ** 20:.0f} MiB; refusing it "
                           f"(a decompression-bomb guard)")
    if not inflater.eof:
        raise DatasetError(f"{source}: corrupted gzip data (it ends before the gzip stream does: truncated)")
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed (``*.gz``) or raw, into a NumPy array.

    Returns the header's shape, e.g. (60000, 28, 28) uint8 images or (60000,) uint8 labels.

    Raises:
        DatasetError: naming the file and what is wrong with it.
    """
    return parse_idx(read_idx_bytes(path), str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes (header + big-endian data) of `array`, shape (d0, d1, ...)."""
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        raise DTypeError(f"IDX cannot store dtype {array.dtype}; expected one of: {_known_codes()}")
    if not 1 <= array.ndim <= 255:
        raise ShapeError(f"IDX stores arrays of 1 to 255 dimensions, got shape {array.shape}")
    if max(array.shape) >= 2**32:
        raise ShapeError(f"IDX dimensions must be below 2**32, got shape {array.shape}")
    code = _IDX_CODES[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, *, gzip: bool | None = None) -> Path:
    """Write `array` as an IDX file, atomically (temp file, fsync, rename).

    Args:
        path: destination; its folder is created if needed.
        array: any shape with 1 to 255 axes; dtype uint8, int8, int16, int32, float32 or float64.
        gzip: compress; by default when `path` ends in ``.gz``.

    Returns the path written.

    Raises:
        DTypeError / ShapeError: the array cannot be stored as IDX.
        DatasetError: the file cannot be written.
    """
    path = Path(path)
    payload = encode_idx(array)
    if gzip if gzip is not None else path.suffix == ".gz":
        payload = gzip_lib.compress(payload, mtime=0)
    atomic_write_bytes(path, payload)
    return path


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write `payload` to `path` so that readers see the old file or the whole new one.

    The bytes go to a temp file in the same folder, are fsync'ed, then renamed over `path`;
    on any failure the temp file is removed.

    Raises:
        DatasetError: the folder or file cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as file:
            file.write(payload)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot write file: {exc.strerror or exc}") from exc


def md5_hex(payload: bytes) -> str:
    return hashlib.md5(payload, usedforsecurity=False).hexdigest()


def file_md5(path: str | os.PathLike) -> str:
    """MD5 (hex) of the decompressed bytes of an IDX file, the checksum the registry holds."""
    return md5_hex(read_idx_bytes(path))
