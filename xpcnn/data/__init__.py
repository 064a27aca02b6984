"""Data on the host: the IDX format, the datasets (registry, lookup, download, loading) and
image files made into model input.

    idx.py       IDX files: read, parse, encode, write; the one size-guarded gunzip
    datasets.py  MNIST / Fashion-MNIST: registry, where files are found, download with
                 checksums, `load_mnist` / `load_dataset` / `load_split`
    images.py    pictures and array files -> ``(N, 1, H, W)`` float images (``xpcnn predict``)

    >>> (x_train, t_train), (x_test, t_test) = load_mnist(flatten=False)
"""

from .datasets import (
    DATASETS,
    DOWNLOAD_TIMEOUT,
    FASHION_MNIST,
    MNIST,
    ROLES,
    SPLIT_ROLES,
    DatasetSpec,
    FileSpec,
    cache_dir,
    candidate_dirs,
    check_official_copies,
    class_names,
    download_dataset,
    download_file,
    find_dataset_files,
    get_spec,
    load_dataset,
    load_idx_pair,
    load_mnist,
    load_split,
    mirror_urls,
    prepare_images,
    prepare_labels,
    register_dataset,
    verify_files,
)
from .idx import (
    GZIP_MAGIC,
    IDX_DTYPES,
    MAX_IDX_BYTES,
    atomic_write_bytes,
    encode_idx,
    file_md5,
    gunzip,
    md5_hex,
    parse_idx,
    read_idx,
    read_idx_bytes,
    write_idx,
)
from .images import InputFile, load_images, read_input_bytes, read_input_file

__all__ = [
    "DATASETS", "DOWNLOAD_TIMEOUT", "FASHION_MNIST", "MNIST", "ROLES", "SPLIT_ROLES", "DatasetSpec", "FileSpec",
    "cache_dir", "candidate_dirs", "check_official_copies", "class_names", "download_dataset", "download_file",
    "find_dataset_files", "get_spec", "load_dataset", "load_idx_pair", "load_mnist", "load_split", "mirror_urls",
    "prepare_images", "prepare_labels", "register_dataset", "verify_files", "GZIP_MAGIC", "IDX_DTYPES",
    "MAX_IDX_BYTES", "atomic_write_bytes", "encode_idx", "file_md5", "gunzip", "md5_hex", "parse_idx", "read_idx",
    "read_idx_bytes", "write_idx", "InputFile", "load_images", "read_input_bytes", "read_input_file",
]
