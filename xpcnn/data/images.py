"""Your own files -> the model's input array: what ``xpcnn predict`` reads.

    >>> x = load_images(["shoe.jpg", "digit.png"])          # (2, 1, 28, 28) float32 in [0, 1]
    >>> proba = net.predict_proba(x)                         # (2, 10)

Picture files (PNG, JPEG, BMP, GIF and anything else Pillow reads) are prepared the way the
datasets were made, so the model sees what it was trained on:

1. grayscale (transparent pixels count as white paper; a phone photo's EXIF rotation is applied);
2. inverted when the background is light: the datasets are light-on-dark. With
   ``invert="auto"`` the median of the border pixels decides (above 0.5: light background,
   inverted); ``"yes"``/``"no"`` force it;
3. framed into H x W as the dataset framed its images, keeping the aspect ratio (area-averaged
   when shrinking), on black: ``fit="fill"`` trims the picture to its content and scales the
   longest side to the full size (Fashion-MNIST's recipe), ``"digit"`` trims it, fits it into
   20x20 and centres its centre of mass (MNIST's recipe), ``"whole"`` keeps the margins.
   The background level (the border's median) is subtracted first; a picture already of the
   model's size is taken as it is;
4. float32 in [0, 1] (8-bit values / 255, exactly as the datasets are scaled).

Array files are taken as they are (they are data, not pictures): ``.npy`` (``numpy.save``)
and IDX (the datasets' own format, optionally gzipped) holding one image ``(H, W)``, several
``(N, H, W)``, ``(N, 1, H, W)`` or flattened ``(N, H*W)``, as uint8 0..255 or float in [0, 1],
already at the model's H x W. Only ``invert="yes"`` inverts them.

Every problem with a file raises `ImageFileError` naming the file, what was expected and what
was found; a file is never decoded when its header declares more than `MAX_IMAGE_PIXELS`.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import DatasetError, ImageFileError
from .idx import GZIP_MAGIC, gunzip, parse_idx

INVERT_CHOICES = ("auto", "yes", "no")
FIT_CHOICES = ("fill", "digit", "whole")

#: Pictures larger than this (width x height, from the header) are refused before decoding.
#: 50 megapixels takes any phone photo; a decompression bomb declares far more.
MAX_IMAGE_PIXELS = 50_000_000

#: Array files (``.npy``, IDX, gzipped IDX) larger than this are refused before reading.
MAX_ARRAY_BYTES = 512 * 2 ** 20

_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class InputFile:
    """One file, read and prepared.

    Attributes:
        path: the file as given.
        images: ``(K, H, W)`` float32 in [0, 1], light-on-dark; K = 1 for a picture.
        kind: ``"image"``, ``"npy"`` or ``"idx"``.
        inverted: whether the values were inverted (see `prepare_image`).
        source_size: ``(height, width)`` of the picture or array images as stored.
    """

    path: str
    images: np.ndarray
    kind: str
    inverted: bool
    source_size: tuple[int, int]


def _check_invert(invert: str) -> str:
    if invert not in INVERT_CHOICES:
        raise ImageFileError(f"invert must be one of {INVERT_CHOICES}, got {invert!r}")
    return invert


def _check_size(size: Any) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ImageFileError(f"size must be (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise ImageFileError(f"size must be positive (height, width), got {size!r}")
    return height, width


def _border(gray: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of ``(H, W)`` values."""
    if min(gray.shape) <= 1:
        return gray.ravel()
    return np.concatenate([gray[0, :], gray[-1, :], gray[1:-1, 0], gray[1:-1, -1]])


def border_is_light(gray: np.ndarray) -> bool:
    """Whether the median of the outermost ring of pixels of ``(H, W)`` values in [0, 1] is
    above 0.5, i.e. the picture is dark-on-light and must be inverted to look like the data.

    On the 10,000 test images of MNIST and of Fashion-MNIST this is False for every image and
    True for every inverted one (the largest border median there is 0.36).
    """
    return bool(np.median(_border(gray)) > 0.5)


def content_box(gray: np.ndarray, level: float = 0.1) -> tuple[slice, slice] | None:
    """Rows and columns of light-on-dark ``(H, W)`` values that hold the picture's content:
    pixels brighter than the background (the border's median) by more than `level` of the way
    to the brightest pixel. None for a blank picture."""
    background, peak = float(np.median(_border(gray))), float(gray.max())
    if peak - background < 0.05:
        return None
    mask = gray > background + level * (peak - background)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _centre_of_mass_shift(image: np.ndarray) -> tuple[int, int]:
    """The whole-pixel shift that moves the centre of mass of `image` to its centre."""
    total = float(image.sum())
    if total <= 0:
        return 0, 0
    rows, cols = np.indices(image.shape)
    centre_row, centre_col = (image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2
    return (round(centre_row - float((rows * image).sum()) / total),
            round(centre_col - float((cols * image).sum()) / total))


def _shifted(image: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """`image` moved by whole pixels, never further than its empty margins allow."""
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    if rows.size == 0:
        return image
    dy = int(np.clip(shift[0], -rows[0], image.shape[0] - 1 - rows[-1]))
    dx = int(np.clip(shift[1], -cols[0], image.shape[1] - 1 - cols[-1]))
    return np.roll(image, (dy, dx), axis=(0, 1))        # only empty margin wraps around


def frame(gray: np.ndarray, size: tuple[int, int] = (28, 28), fit: str = "fill") -> np.ndarray:
    """Light-on-dark ``(h, w)`` values -> ``size``, framed the way a dataset framed its images.

    - ``"fill"``: trimmed to its content (`content_box`), the longest side scaled to the full
      size, centred: Fashion-MNIST's recipe (trim, resize the longest edge to 28, centre).
    - ``"digit"``: trimmed, fitted into a 20x20 box (20/28 of `size`), then moved so that its
      centre of mass is at the centre: MNIST's recipe.
    - ``"whole"``: the whole picture fitted into `size`, margins kept.

    Any other picture first has its dark background's level (the border's median, when at most
    0.5) subtracted: the datasets' background is 0, a photographed sheet of paper never is. A picture already of
    `size` is taken as it is, in every mode (it is presumably framed like the data).
    """
    if fit not in FIT_CHOICES:
        raise ImageFileError(f"fit must be one of {FIT_CHOICES}, got {fit!r}")
    if gray.shape == tuple(size):
        return gray
    background = np.float32(np.median(_border(gray)))
    if 0 < background <= 0.5:            # above 0.5 the light background was kept on purpose (invert="no")
        gray = np.clip(gray - background, 0.0, 1.0)
    if fit == "whole":
        return fit_into(gray, size)
    box = content_box(gray)
    content = gray[box] if box is not None else gray
    if fit == "fill":
        return fit_into(content, size)
    height, width = size
    inner = fit_into(content, (max(1, round(height * 20 / 28)), max(1, round(width * 20 / 28))))
    out = np.zeros(size, dtype=np.float32)
    top, left = (height - inner.shape[0]) // 2, (width - inner.shape[1]) // 2
    out[top:top + inner.shape[0], left:left + inner.shape[1]] = inner
    return _shifted(out, _centre_of_mass_shift(out))


def fit_into(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` float32 -> ``size`` float32: scaled to fit keeping the aspect ratio, centred on 0.

    Shrinking averages the covered area (Pillow's BOX filter, so an image enlarged by an
    integer factor with nearest-neighbour comes back exactly); enlarging is bilinear. An image
    already of `size` is returned unchanged.
    """
    from PIL import Image

    height, width = size
    h, w = gray.shape
    if (h, w) == (height, width):
        return gray
    scale = min(height / h, width / w)
    new_h, new_w = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32)).resize((new_w, new_h), resample))
    out = np.zeros((height, width), dtype=np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top:top + new_h, left:left + new_w] = np.clip(resized, 0.0, 1.0)
    return out


def prepare_image(pixels: np.ndarray, size: tuple[int, int] = (28, 28), invert: str = "auto",
                  full_scale: float = 255.0, fit: str = "fill") -> tuple[np.ndarray, bool]:
    """One grayscale picture ``(h, w)`` (0..`full_scale`) -> ``(size, inverted)``: float32 in
    [0, 1], light-on-dark, framed into `size` by `frame` (steps 2-4 of the module docstring).

    8-bit values are divided by 255 in float32, as `xpcnn.data` scales the datasets, so a 28x28
    light-on-dark picture gives exactly the dataset's array.
    """
    invert = _check_invert(invert)
    size = _check_size(size)
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise ImageFileError(f"expected a grayscale picture (height, width) with pixels, got shape {pixels.shape}")
    raw = pixels.astype(np.float32)
    scale = np.float32(full_scale)
    gray = raw / scale
    inverted = invert == "yes" or (invert == "auto" and border_is_light(gray))
    if inverted:
        gray = (scale - raw) / scale          # exact for 8-bit values: (255 - v) / 255
    return frame(np.clip(gray, 0.0, 1.0), size, fit), inverted


# ----------------------------------------------------------------------- reading files


def _header_size(head: bytes) -> tuple[int, int] | None:
    """``(width, height)`` declared by a PNG, GIF or BMP header, read without decoding."""
    if head.startswith(_PNG_MAGIC) and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:2] == b"BM" and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)
    return None


def _check_declared(path: str, width: int, height: int, max_pixels: int) -> None:
    """Refuse a picture by the size its header declares, before any pixel is decoded."""
    if width == 0 or height == 0:
        raise ImageFileError(f"{path}: the picture is {width} x {height} pixels (width x height): nothing to classify")
    if width * height > max_pixels:
        raise ImageFileError(
            f"{path}: the picture is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels), over the "
            f"limit of {max_pixels / 1e6:.0f} megapixels; refusing to decode it (a decompression-bomb guard): "
            f"shrink it first")


def _read_picture(path: str, head: bytes, size: tuple[int, int], invert: str, fit: str, max_pixels: int,
                  source: Any = None) -> InputFile:
    """`source`: the bytes to decode as a file object (`read_input_bytes`); None: open `path`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    declared = _header_size(head)          # PNG, GIF, BMP: before Pillow parses anything
    if declared is not None:
        _check_declared(path, *declared, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our own limit is lower
            with Image.open(path if source is None else source) as picture:        # reads the header only
                _check_declared(path, *picture.size, max_pixels)          # JPEG and the rest
                upright = ImageOps.exif_transpose(picture)       # as a phone shows its photo
                pixels, full_scale = _grayscale(upright)
                width, height = upright.size
    except ImageFileError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageFileError(f"{path}: refusing to decode a picture over {max_pixels / 1e6:.0f} megapixels "
                             f"(a decompression-bomb guard; Pillow: {exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageFileError(f"{path}: not a picture Pillow can read (PNG, JPEG, BMP, GIF, ...), nor a .npy or "
                             f"IDX array file") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        # Pillow reports a truncated or corrupted body as OSError ("image file is truncated"),
        # SyntaxError or ValueError, depending on the format.
        raise ImageFileError(f"{path}: cannot decode the picture (truncated or corrupted?): {exc}") from exc
    images, inverted = prepare_image(pixels, size, invert, full_scale, fit)
    return InputFile(path, images[None], "image", inverted, (height, width))


def _grayscale(picture: Any) -> tuple[np.ndarray, float]:
    """A Pillow image -> ``(h, w)`` array of gray levels and the value meaning white."""
    from PIL import Image

    mode = picture.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(picture)
        if mode == "F":
            return values.astype(np.float32), 1.0 if values.size and values.max() <= 1.0 else 255.0
        return values, 65535.0 if mode.startswith("I;16") or (values.size and values.max() > 255) else 255.0
    if "A" in mode or "transparency" in picture.info:
        # Drawing programs leave the paper transparent: lay the picture on white paper.
        rgba = picture.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(paper, rgba)
    return np.asarray(picture.convert("L")), 255.0


def _array_images(array: np.ndarray, path: str, kind: str, size: tuple[int, int], invert: str) -> InputFile:
    """``(H, W)``, ``(N, H, W)``, ``(N, 1, H, W)`` or ``(N, H*W)`` uint8/float -> `InputFile`."""
    height, width = size
    shape = array.shape
    if array.ndim == 2 and shape != (height, width) and shape[1] == height * width:
        images = array.reshape(shape[0], height, width)              # load_mnist(flatten=True) rows
    elif array.ndim == 2:
        images = array[None]
    elif array.ndim == 3:
        images = array
    elif array.ndim == 4 and shape[1] == 1:
        images = array[:, 0]
    else:
        raise ImageFileError(f"{path}: expected an array of images (H, W), (N, H, W), (N, 1, H, W) or (N, H*W), "
                             f"got shape {shape}")
    if images.shape[1:] != (height, width):
        raise ImageFileError(f"{path}: holds {images.shape[1]}x{images.shape[2]} images, but the model takes "
                             f"{height}x{width}; arrays are used as they are (save them as picture files to have "
                             f"them fitted)")
    if images.shape[0] == 0:
        raise ImageFileError(f"{path}: holds no images (shape {shape})")
    if images.dtype == np.uint8:
        values = images.astype(np.float32)
        values /= np.float32(255)
    elif images.dtype.kind == "f" and images.dtype.itemsize <= 8:
        values = images.astype(np.float32)
        if not np.isfinite(values).all():
            raise ImageFileError(f"{path}: holds NaN or infinite values; expected pixels in [0, 1]")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise ImageFileError(f"{path}: float pixels must lie in [0, 1] (the datasets' scale), found values "
                                 f"from {low:g} to {high:g}; divide 0..255 values by 255 or save them as uint8")
    else:
        raise ImageFileError(f"{path}: expected uint8 (0..255) or float (0..1) pixels, got dtype {images.dtype}")
    inverted = invert == "yes"
    if inverted:
        values = 1 - values
    return InputFile(path, np.ascontiguousarray(values), kind, inverted, (height, width))


def _read_npy(path: str, size: tuple[int, int], invert: str, source: Any = None) -> InputFile:
    try:
        if source is None:
            array = np.load(path, mmap_mode="r", allow_pickle=False)       # the header only, for now
        else:
            array = np.load(source, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ImageFileError(f"{path}: not a readable .npy array (truncated, or saved with pickled objects?): "
                             f"{exc}") from exc
    if not isinstance(array, np.ndarray):
        raise ImageFileError(f"{path}: expected one array saved with numpy.save, got {type(array).__name__}")
    if array.nbytes > MAX_ARRAY_BYTES:
        raise ImageFileError(f"{path}: the array is {array.nbytes / 2 ** 20:.0f} MiB, over the limit of "
                             f"{MAX_ARRAY_BYTES / 2 ** 20:.0f} MiB; split it into smaller files")
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise ImageFileError(f"{path}: expected uint8 (0..255) or float (0..1) pixels, got dtype {array.dtype}")
    return _array_images(np.asarray(array), path, "npy", size, invert)


def _read_idx(path: str, raw: bytes, size: tuple[int, int], invert: str) -> InputFile:
    try:
        data = gunzip(raw, path, MAX_ARRAY_BYTES) if raw[:2] == GZIP_MAGIC else raw
        if data[:2] != b"\x00\x00":
            raise ImageFileError(f"{path}: a gzip file that does not hold an IDX array")
        array = parse_idx(data, path)
    except DatasetError as exc:
        raise ImageFileError(str(exc)) from exc
    return _array_images(array, path, "idx", size, invert)


def read_input_file(path: "str | os.PathLike[str]", size: tuple[int, int] = (28, 28), invert: str = "auto",
                    *, fit: str = "fill", max_pixels: int = MAX_IMAGE_PIXELS) -> InputFile:
    """Read one picture or array file and prepare its images for a model taking `size` images
    (`invert` and `fit` as in `prepare_image` and `frame`; arrays are never framed).

    Returns an `InputFile` whose ``images`` are ``(K, *size)`` float32 in [0, 1].

    Raises:
        ImageFileError: missing, a directory, unreadable, not a picture or array file, over
            `max_pixels` (checked from the header, before decoding), truncated or corrupted,
            or an array of the wrong shape, dtype or range.
    """
    invert, size = _check_invert(invert), _check_size(size)
    if fit not in FIT_CHOICES:
        raise ImageFileError(f"fit must be one of {FIT_CHOICES}, got {fit!r}")
    name = os.fspath(path)
    file = Path(name)
    try:
        if file.is_dir():
            raise ImageFileError(f"{name}: is a directory; expected a picture, .npy or IDX file "
                                 f"(use {name}/* for its files)")
        with open(file, "rb") as fh:
            head = fh.read(64)
            file_size = os.fstat(fh.fileno()).st_size
            is_array = head.startswith(_NPY_MAGIC) or head[:2] in (GZIP_MAGIC, b"\x00\x00")
            if is_array and file_size > MAX_ARRAY_BYTES:
                raise ImageFileError(f"{name}: {file_size / 2 ** 20:.0f} MiB, over the limit of "
                                     f"{MAX_ARRAY_BYTES / 2 ** 20:.0f} MiB for array files")
            raw = head + fh.read() if head[:2] in (GZIP_MAGIC, b"\x00\x00") else b""
    except FileNotFoundError:
        raise ImageFileError(f"{name}: no such file") from None
    except OSError as exc:
        raise ImageFileError(f"{name}: cannot read the file: {exc.strerror or exc}") from exc
    if not head:
        raise ImageFileError(f"{name}: the file is empty; expected a picture, .npy or IDX file")
    if head.startswith(_NPY_MAGIC):
        return _read_npy(name, size, invert)
    if raw:
        return _read_idx(name, raw, size, invert)
    return _read_picture(name, head, size, invert, fit, max_pixels)


def read_input_bytes(data: bytes, name: str = "upload", size: tuple[int, int] = (28, 28), invert: str = "auto", *,
                     fit: str = "fill", max_pixels: int = MAX_IMAGE_PIXELS) -> InputFile:
    """`read_input_file` for a file's contents already in memory (an upload to ``xpcnn serve``):
    the same checks and the same preparation, so the same bytes give the same images. `name`
    only labels the messages; no file is opened. The caller bounds ``len(data)``.

    Raises:
        ImageFileError: as `read_input_file`.
    """
    invert, size = _check_invert(invert), _check_size(size)
    if fit not in FIT_CHOICES:
        raise ImageFileError(f"fit must be one of {FIT_CHOICES}, got {fit!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageFileError(f"{name}: expected the file's bytes, got {type(data).__name__}")
    data = bytes(data)
    head = data[:64]
    if not head:
        raise ImageFileError(f"{name}: the file is empty; expected a picture, .npy or IDX file")
    if len(data) > MAX_ARRAY_BYTES and (head.startswith(_NPY_MAGIC) or head[:2] in (GZIP_MAGIC, b"\x00\x00")):
        raise ImageFileError(f"{name}: {len(data) / 2 ** 20:.0f} MiB, over the limit of "
                             f"{MAX_ARRAY_BYTES / 2 ** 20:.0f} MiB for array files")
    if head.startswith(_NPY_MAGIC):
        return _read_npy(name, size, invert, io.BytesIO(data))
    if head[:2] in (GZIP_MAGIC, b"\x00\x00"):
        return _read_idx(name, data, size, invert)
    return _read_picture(name, head, size, invert, fit, max_pixels, io.BytesIO(data))


def load_images(paths: Iterable["str | os.PathLike[str]"], input_dim: tuple[int, int, int] = (1, 28, 28),
                invert: str = "auto", dtype: str = "float32", fit: str = "fill") -> np.ndarray:
    """Picture and array files -> the model's input ``(N, C, H, W)`` (`dtype`, values in [0, 1]).

    `input_dim` is the network's ``config["input_dim"]`` (one channel: the datasets are
    grayscale); `fit` is ``"fill"`` for Fashion-MNIST models, ``"digit"`` for MNIST ones
    (see `frame`). A ``.npy`` or IDX file may contribute several images, in order. The first bad
    file raises `ImageFileError` (``xpcnn predict`` instead reports it and goes on).
    """
    channels, height, width = (int(v) for v in input_dim)
    if channels != 1:
        raise ImageFileError(f"pictures are read as grayscale (1 channel), but the model takes {channels} channels")
    if np.dtype(dtype).name not in ("float32", "float64"):
        raise ImageFileError(f"dtype must be float32 or float64, got {dtype!r}")
    arrays = [read_input_file(path, (height, width), invert, fit=fit).images for path in paths]
    if not arrays:
        raise ImageFileError("no files given")
    return np.concatenate(arrays)[:, None].astype(dtype, copy=False)
