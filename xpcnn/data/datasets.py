"""Datasets on the host: the MNIST / Fashion-MNIST registry, lookup, download and loading
(the IDX format itself is in `idx.py`).

Everything here is host NumPy; the trainer moves the arrays to the device once.

    >>> (x_train, t_train), (x_test, t_test) = load_mnist(flatten=False)
    >>> x_train.shape, x_train.dtype, t_train.dtype        # ((60000, 1, 28, 28), float32, int64)
    >>> x, t = load_split("mnist", "test", data_dir="/work/shared/data/mnist")   # (10000, 784)

Where a dataset is looked for, in order (the first directory holding every needed file wins):

1. the explicit ``data_dir`` (the CLI's ``--data-dir``): the files directly in it, or in
   ``data_dir/<name>``;
2. ``$XPCNN_DATA_DIR/<name>``;
3. the user cache ``$XDG_CACHE_HOME/xpcnn/<name>`` (default ``~/.cache/xpcnn/<name>``);
4. ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist`` installs there).

Each file may be gzip-compressed (``name.gz``) or not. With ``download=True`` missing files are
fetched from the dataset's mirrors (or ``$XPCNN_MIRRORS``) into the cache, and kept only when
the MD5 of their decompressed bytes matches the registry.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import ConfigError, DatasetError
from .idx import GZIP_MAGIC, atomic_write_bytes, file_md5, gunzip, md5_hex, read_idx, read_idx_bytes

# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

#: The four files of an MNIST-like dataset, by role.
ROLES = ("train_images", "train_labels", "test_images", "test_labels")
SPLIT_ROLES = {"train": ("train_images", "train_labels"), "test": ("test_images", "test_labels")}


@dataclass(frozen=True)
class FileSpec:
    """One IDX file of a dataset.

    Attributes:
        filename: the name without ``.gz``, e.g. ``"train-images-idx3-ubyte"``.
        md5: hex MD5 of the decompressed bytes (gzip wrappers differ between mirrors).
        size: size in bytes of the decompressed file.
    """

    filename: str
    md5: str
    size: int


@dataclass(frozen=True)
class DatasetSpec:
    """An MNIST-like dataset: four IDX files, where to download them, and how to get it offline.

    Attributes:
        name: registry key and folder name, e.g. ``"fashion-mnist"``.
        files: role (one of `ROLES`) -> `FileSpec`.
        mirrors: base URLs (ending in ``/``) that serve ``<filename>.gz``.
        num_classes: labels lie in ``[0, num_classes)``.
        offline_hint: how to get the data without downloading, for the not-found message.
        class_names: the name of each label ``0 .. num_classes-1`` (empty: the numbers).
        picture_fit: how `xpcnn.data.images.frame` frames a picture like this dataset's images
            (``"fill"``: Fashion-MNIST's trim-and-fill, ``"digit"``: MNIST's 20x20 box centred
            by mass).
    """

    name: str
    files: dict[str, FileSpec]
    mirrors: tuple[str, ...] = ()
    num_classes: int = 10
    offline_hint: str = ""
    class_names: tuple[str, ...] = ()
    picture_fit: str = "fill"

    def __post_init__(self) -> None:
        missing = [role for role in ROLES if role not in self.files]
        if missing:
            raise ConfigError(f"DatasetSpec {self.name!r}: files must have the roles {ROLES}, missing {missing}")


def _mnist_like_files(md5s: Sequence[str], train_count: int, test_count: int) -> dict[str, FileSpec]:
    image_bytes, header_images, header_labels = 28 * 28, 16, 8
    sizes = (
        header_images + train_count * image_bytes, header_labels + train_count,
        header_images + test_count * image_bytes, header_labels + test_count,
    )
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return {role: FileSpec(name, md5, size) for role, name, md5, size in zip(ROLES, names, md5s, sizes)}


MNIST = DatasetSpec(
    name="mnist",
    # t10k MD5s: /work/shared/data/mnist/README.md, and recomputed from those files.
    # train MD5s: the widely published MD5s of the decompressed training files (they appear
    # beside the t10k values above in many public download scripts, labelled as the
    # extracted/raw files). No copy of the training set was reachable offline here, so these
    # two were not recomputed by us.
    files=_mnist_like_files(
        (
            "6bbc9ace898e44ae57da46a324031adb",
            "a25bea736e30d166cdddb491f175f624",
            "2646ac647ad5339dbf082846283269ea",
            "27ae3e4e09519cfbb04c329615203637",
        ),
        train_count=60000,
        test_count=10000,
    ),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    offline_hint=(
        "no system package ships MNIST; offline, copy the four files into a folder and pass "
        "--data-dir, or use --dataset fashion-mnist after `apt-get install dataset-fashion-mnist`"
    ),
    class_names=tuple(str(digit) for digit in range(10)),
    picture_fit="digit",
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    # Computed from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
    files=_mnist_like_files(
        (
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "9018921c3c673c538a1fc5bad174d6f9",
            "8181f5470baa50b63fa0f6fddb340f0a",
            "15d484375f8d13e6eb1aabb0c3f46965",
        ),
        train_count=60000,
        test_count=10000,
    ),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    offline_hint="`apt-get install dataset-fashion-mnist` installs it in /usr/share/datasets/fashion-mnist",
    # The labels' names from Fashion-MNIST's README, in label order.
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
)

#: Registered datasets by name; add your own with `register_dataset`.
DATASETS: dict[str, DatasetSpec] = {MNIST.name: MNIST, FASHION_MNIST.name: FASHION_MNIST}


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add `spec` to `DATASETS` so that it can be loaded by name."""
    if spec.name in DATASETS and not replace:
        raise ConfigError(f"dataset {spec.name!r} is already registered; pass replace=True to override it")
    DATASETS[spec.name] = spec
    return spec


def class_names(dataset: str | DatasetSpec | None, num_classes: int = 10) -> list[str]:
    """The names of labels ``0 .. num_classes-1`` of a registered dataset (``"fashion-mnist"``
    -> ``["T-shirt/top", "Trouser", ...]``); the numbers as text for an unknown or unnamed one."""
    names: tuple[str, ...] = ()
    if dataset is not None:
        try:
            names = get_spec(dataset).class_names
        except DatasetError:
            names = ()
    return list(names) if len(names) == num_classes else [str(label) for label in range(num_classes)]


def get_spec(dataset: str | DatasetSpec) -> DatasetSpec:
    """The `DatasetSpec` for a name (``"mnist"``, ``"fashion-mnist"``/``"fashion_mnist"``) or a spec."""
    if isinstance(dataset, DatasetSpec):
        return dataset
    key = str(dataset).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}: expected one of {sorted(DATASETS)}")
    return DATASETS[key]


# --------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------

#: System folders that may hold ``<name>/`` dataset folders (tests pass their own).
SYSTEM_DATA_DIRS: tuple[str, ...] = ("/usr/share/datasets",)


def cache_dir(name: str) -> Path:
    """The user cache folder of dataset `name`: ``$XDG_CACHE_HOME/xpcnn/<name>`` or ``~/.cache/xpcnn/<name>``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "xpcnn" / name


def candidate_dirs(
    name: str, data_dir: str | os.PathLike | None = None, system_dirs: Iterable[str | os.PathLike] | None = None
) -> list[Path]:
    """The folders searched for dataset `name`, in order, without duplicates."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / name]
    env_dir = os.environ.get("XPCNN_DATA_DIR", "")
    if env_dir:
        dirs.append(Path(env_dir) / name)
    dirs.append(cache_dir(name))
    dirs += [Path(system) / name for system in (SYSTEM_DATA_DIRS if system_dirs is None else system_dirs)]
    return list(dict.fromkeys(path.expanduser() for path in dirs))


def _file_in(directory: Path, filename: str) -> Path | None:
    for candidate in (directory / filename, directory / f"{filename}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _files_in(directory: Path, spec: DatasetSpec, roles: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    found, missing = {}, []
    for role in roles:
        path = _file_in(directory, spec.files[role].filename)
        if path is None:
            missing.append(spec.files[role].filename)
        else:
            found[role] = path
    return found, missing


def _search(spec: DatasetSpec, roles: Sequence[str], dirs: Sequence[Path]) -> tuple[dict[str, Path] | None, list[str]]:
    tried = []
    for directory in dirs:
        if not directory.is_dir():
            tried.append(f"{directory} (no such folder)")
            continue
        found, missing = _files_in(directory, spec, roles)
        if not missing:
            return found, tried
        tried.append(f"{directory} (missing {', '.join(missing)})")
    return None, tried


def _not_found_message(spec: DatasetSpec, roles: Sequence[str], tried: Sequence[str]) -> str:
    needed = ", ".join(f"{spec.files[role].filename}[.gz]" for role in roles)
    hint = f"; {spec.offline_hint}" if spec.offline_hint else ""
    return (
        f"dataset {spec.name!r} not found: no folder holds all of {needed}. Tried: {'; '.join(tried)}. "
        f"Fix: pass --data-dir DIR (or data_dir=) pointing at the files, set XPCNN_DATA_DIR, "
        f"or download them with --download (download=True){hint}"
    )


def find_dataset_files(
    dataset: str | DatasetSpec,
    roles: Sequence[str] = ROLES,
    *,
    data_dir: str | os.PathLike | None = None,
    system_dirs: Iterable[str | os.PathLike] | None = None,
) -> dict[str, Path]:
    """Paths of the files of `roles` from the first folder that holds all of them.

    Raises:
        DatasetError: no folder has them; the message lists every folder tried and what was missing.
    """
    spec = get_spec(dataset)
    found, tried = _search(spec, roles, candidate_dirs(spec.name, data_dir, system_dirs))
    if found is None:
        raise DatasetError(_not_found_message(spec, roles, tried))
    return found


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------

#: Seconds a mirror may stay silent before it is skipped.
DOWNLOAD_TIMEOUT = 20.0


def mirror_urls(spec: DatasetSpec, mirrors: Sequence[str] | str | None = None) -> list[str]:
    """Base URLs to try, in order: `mirrors`, else ``$XPCNN_MIRRORS`` (space/comma separated), else the spec's."""
    if mirrors is None:
        mirrors = os.environ.get("XPCNN_MIRRORS", "") or spec.mirrors
    if isinstance(mirrors, str):
        mirrors = mirrors.replace(",", " ").split()
    urls = [url if url.endswith("/") else url + "/" for url in mirrors]
    if not urls:
        raise DatasetError(f"dataset {spec.name!r} has no download mirrors; pass mirrors= or set XPCNN_MIRRORS")
    return urls


def _http_get(url: str, timeout: float, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "xpcnn"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = response.read(max_bytes + 1)
    if len(payload) > max_bytes:
        raise ValueError(f"response larger than the expected {max_bytes} bytes")
    return payload


def _try_mirror(url: str, file_spec: FileSpec, timeout: float) -> tuple[bytes | None, str]:
    """(payload, "") when `url` serves the right file, else (None, why not)."""
    try:
        payload = _http_get(url, timeout, max_bytes=2 * file_spec.size + 65536)
    except urllib.error.HTTPError as exc:
        return None, f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        return None, str(exc.reason)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    try:
        raw = gunzip(payload, url, file_spec.size) if payload[:2] == GZIP_MAGIC else payload
    except DatasetError as exc:
        return None, str(exc)
    actual = md5_hex(raw)
    if actual != file_spec.md5:
        return None, f"checksum mismatch: MD5 of the decompressed bytes is {actual}, expected {file_spec.md5}"
    return payload, ""


def download_file(
    file_spec: FileSpec, mirrors: Sequence[str], dest_dir: str | os.PathLike, *, timeout: float = DOWNLOAD_TIMEOUT
) -> Path:
    """Fetch ``<filename>.gz`` from the first mirror that serves it with the right checksum.

    The file is written atomically to `dest_dir` (as ``.gz`` when the mirror sent gzip data).
    Nothing is written unless the MD5 of the decompressed bytes matches `file_spec.md5`.

    Raises:
        DatasetError: every mirror failed; names the file, the expected checksum and each
            mirror's reason (HTTP error, refused, timeout, checksum mismatch with the actual MD5).
    """
    failures = []
    for base in mirrors:
        url = f"{base}{file_spec.filename}.gz"
        payload, reason = _try_mirror(url, file_spec, timeout)
        if payload is None:
            failures.append(f"{url}: {reason}")
            continue
        suffix = ".gz" if payload[:2] == GZIP_MAGIC else ""
        dest = Path(dest_dir) / f"{file_spec.filename}{suffix}"
        atomic_write_bytes(dest, payload)
        return dest
    raise DatasetError(
        f"could not download {file_spec.filename} (expected MD5 {file_spec.md5} of the decompressed "
        f"bytes) from any of {len(failures)} mirror(s): {'; '.join(failures)}"
    )


def download_dataset(
    dataset: str | DatasetSpec,
    roles: Sequence[str] = ROLES,
    *,
    dest_dir: str | os.PathLike | None = None,
    mirrors: Sequence[str] | str | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> dict[str, Path]:
    """Make sure `dest_dir` (default: the user cache) holds verified files for `roles`.

    Files already there with the right checksum are kept; others are fetched.
    Returns role -> path.
    """
    spec = get_spec(dataset)
    dest = Path(dest_dir) if dest_dir is not None else cache_dir(spec.name)
    urls = mirror_urls(spec, mirrors)
    paths = {}
    for role in roles:
        file_spec = spec.files[role]
        existing = _file_in(dest, file_spec.filename)
        if existing is not None and _md5_or_none(existing) == file_spec.md5:
            paths[role] = existing
        else:
            paths[role] = download_file(file_spec, urls, dest, timeout=timeout)
    return paths


def _md5_or_none(path: Path) -> str | None:
    try:
        return file_md5(path)
    except DatasetError:
        return None


def _decompressed_size(path: Path) -> int:
    """Size of the decompressed file without decompressing (gzip's trailer holds it mod 2**32)."""
    if path.suffix != ".gz":
        return path.stat().st_size
    with open(path, "rb") as file:
        file.seek(-4, os.SEEK_END)
        return int.from_bytes(file.read(4), "little")


def check_official_copies(paths: dict[str, Path], dataset: str | DatasetSpec) -> None:
    """A file with the exact size of the registry's file must also have its MD5.

    Files of other sizes are taken as the user's own data (a subset, a generated set) and are
    not checked; a same-size file with another checksum is a different dataset (MNIST and
    Fashion-MNIST files have identical sizes) or a damaged copy, and is refused.

    Raises:
        DatasetError: naming the file, the dataset and both checksums.
    """
    spec = get_spec(dataset)
    for role, path in paths.items():
        file_spec = spec.files[role]
        try:
            if _decompressed_size(Path(path)) != file_spec.size:
                continue
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read file: {exc.strerror or exc}") from exc
        raw = read_idx_bytes(path)
        if len(raw) == file_spec.size and md5_hex(raw) != file_spec.md5:
            raise DatasetError(
                f"{path}: has the size of {spec.name}'s {file_spec.filename} but the MD5 of its decompressed bytes is "
                f"{md5_hex(raw)}, expected {file_spec.md5}: a different dataset or a damaged copy"
            )


def verify_files(paths: dict[str, Path], dataset: str | DatasetSpec) -> None:
    """Check each role's file against the registry's decompressed size and MD5.

    Raises:
        DatasetError: naming the file, the expected and the actual size or checksum.
    """
    spec = get_spec(dataset)
    for role, path in paths.items():
        file_spec = spec.files[role]
        raw = read_idx_bytes(path)
        if len(raw) != file_spec.size:
            raise DatasetError(
                f"{path}: decompressed size is {len(raw)} bytes, {spec.name} expects {file_spec.size}"
            )
        actual = md5_hex(raw)
        if actual != file_spec.md5:
            raise DatasetError(
                f"{path}: MD5 of the decompressed bytes is {actual}, {spec.name} expects {file_spec.md5}"
            )


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

_OUTPUT_DTYPES = ("float32", "float64", "uint8")


def _check_options(normalize: bool, dtype: str | np.dtype) -> np.dtype:
    try:
        out = np.dtype(dtype) if dtype is not None else None
    except TypeError:
        out = None
    if out is None or out.name not in _OUTPUT_DTYPES:
        raise ConfigError(f"dtype must be one of {_OUTPUT_DTYPES}, got {dtype!r}")
    if normalize and out.kind != "f":
        raise ConfigError(f"normalize=True needs a float dtype (float32 or float64), got {out.name}")
    return out


def prepare_images(images: np.ndarray, *, normalize: bool, flatten: bool, dtype: np.dtype, source: str) -> np.ndarray:
    """uint8 (N, H, W) -> (N, H*W) when `flatten`, else (N, 1, H, W), as `dtype` (divided by 255 when `normalize`)."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{source}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    n, height, width = images.shape
    out = images.astype(dtype)
    if normalize:
        out /= dtype.type(255)
    return out.reshape(n, height * width) if flatten else out.reshape(n, 1, height, width)


def prepare_labels(labels: np.ndarray, *, num_classes: int, one_hot: bool, dtype: np.dtype, source: str) -> np.ndarray:
    """uint8 (N,) -> int64 (N,), or (N, num_classes) one-hot rows of `dtype` when `one_hot`."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(f"{source}: expected integer labels of shape (N,), got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{source}: labels must lie in [0, {num_classes}), found values from {labels.min()} to {labels.max()}"
        )
    labels = labels.astype(np.int64)
    if not one_hot:
        return labels
    rows = np.zeros((labels.size, num_classes), dtype=dtype)
    rows[np.arange(labels.size), labels] = 1
    return rows


def load_idx_pair(
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    *,
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    dtype: str = "float32",
    num_classes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one images file and its labels file into (x, t).

    Returns x: (N, H*W) or, with ``flatten=False``, (N, 1, H, W), as `dtype` (values in [0, 1]
    when `normalize`, else 0..255); t: int64 (N,), or (N, num_classes) one-hot rows of `dtype`.

    Raises:
        DatasetError: a file is corrupted, the counts differ, or a label is out of range.
        ConfigError: bad `dtype`, or ``normalize=True`` with ``dtype="uint8"``.
    """
    out_dtype = _check_options(normalize, dtype)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.shape[:1] != labels.shape[:1]:
        raise DatasetError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    x = prepare_images(images, normalize=normalize, flatten=flatten, dtype=out_dtype, source=str(images_path))
    label_dtype = out_dtype if out_dtype.kind == "f" else np.dtype("float32")
    t = prepare_labels(labels, num_classes=num_classes, one_hot=one_hot_label, dtype=label_dtype,
                       source=str(labels_path))
    return x, t


def _locate(
    spec: DatasetSpec,
    roles: Sequence[str],
    *,
    data_dir: str | os.PathLike | None,
    download: bool,
    mirrors: Sequence[str] | str | None,
    system_dirs: Iterable[str | os.PathLike] | None,
    timeout: float,
) -> dict[str, Path]:
    found, tried = _search(spec, roles, candidate_dirs(spec.name, data_dir, system_dirs))
    if found is not None:
        check_official_copies(found, spec)
        return found
    if not download:
        raise DatasetError(_not_found_message(spec, roles, tried))
    return download_dataset(spec, roles, mirrors=mirrors, timeout=timeout)


def load_split(
    dataset: str | DatasetSpec,
    split: str = "test",
    *,
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    dtype: str = "float32",
    mirrors: Sequence[str] | str | None = None,
    system_dirs: Iterable[str | os.PathLike] | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> tuple[np.ndarray, np.ndarray]:
    """One split (``"train"`` or ``"test"``) of a dataset as (x, t); only its two files are needed.

    Shapes and options as in `load_dataset`, e.g. ``load_split("mnist", "test",
    data_dir="/work/shared/data/mnist")`` -> x (10000, 784) float32, t (10000,) int64.
    """
    if split not in SPLIT_ROLES:
        raise ConfigError(f"split must be one of {sorted(SPLIT_ROLES)}, got {split!r}")
    spec = get_spec(dataset)
    images_role, labels_role = SPLIT_ROLES[split]
    paths = _locate(
        spec, SPLIT_ROLES[split], data_dir=data_dir, download=download, mirrors=mirrors,
        system_dirs=system_dirs, timeout=timeout,
    )
    return load_idx_pair(
        paths[images_role], paths[labels_role], normalize=normalize, flatten=flatten,
        one_hot_label=one_hot_label, dtype=dtype, num_classes=spec.num_classes,
    )


def load_dataset(
    dataset: str | DatasetSpec,
    *,
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    dtype: str = "float32",
    mirrors: Sequence[str] | str | None = None,
    system_dirs: Iterable[str | os.PathLike] | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load a registered dataset (``"mnist"``, ``"fashion-mnist"``) or a `DatasetSpec`.

    Returns ``((x_train, t_train), (x_test, t_test))``:
        x: (N, 784), or (N, 1, 28, 28) with ``flatten=False``; float32 by default (``dtype=
           "float64"`` for float64), divided by 255 when `normalize`, else the raw 0..255
           values (``dtype="uint8"`` with ``normalize=False`` keeps the book's raw uint8).
        t: int64 (N,), or float (N, 10) one-hot rows with ``one_hot_label=True``.

    The four files are searched in `data_dir` (directly or in ``data_dir/<name>``),
    ``$XPCNN_DATA_DIR/<name>``, the user cache, then ``<system dir>/<name>``; the first
    folder that holds all four wins. If none does and `download` is true they are fetched
    into the user cache from `mirrors` (default ``$XPCNN_MIRRORS`` or the registry's).

    Raises:
        DatasetError: not found (lists every folder tried), corrupted, or bad checksum on download.
        ConfigError: unknown `dtype` or an impossible option combination.
    """
    _check_options(normalize, dtype)
    spec = get_spec(dataset)
    # Locate all four together so both splits come from the same folder.
    paths = _locate(
        spec, ROLES, data_dir=data_dir, download=download, mirrors=mirrors, system_dirs=system_dirs, timeout=timeout
    )
    pairs = []
    for split in ("train", "test"):
        images_role, labels_role = SPLIT_ROLES[split]
        pairs.append(
            load_idx_pair(
                paths[images_role], paths[labels_role], normalize=normalize, flatten=flatten,
                one_hot_label=one_hot_label, dtype=dtype, num_classes=spec.num_classes,
            )
        )
    return pairs[0], pairs[1]


def load_mnist(
    normalize: bool = True, flatten: bool = True, one_hot_label: bool = False, **kwargs
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The book's ``load_mnist``: ``((x_train, t_train), (x_test, t_test))`` of MNIST.

    x_train: (60000, 784) float32 in [0, 1] by default; (60000, 1, 28, 28) with
    ``flatten=False``. t_train: (60000,) int64, or (60000, 10) float32 with
    ``one_hot_label=True``. Other keyword arguments go to `load_dataset` (`data_dir`,
    `download`, `dtype`, ...).
    """
    return load_dataset("mnist", normalize=normalize, flatten=flatten, one_hot_label=one_hot_label, **kwargs)
