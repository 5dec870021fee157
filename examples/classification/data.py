"""Digit images for the classification example: one loader for three sources.

- ``"digits"``: the 8x8 digits that ship inside scikit-learn (1797 images; a seeded split into
  1497 training and 300 test images). Needs scikit-learn.
- a folder: MNIST's IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``), read by
  :func:`read_idx` (the format: two zero bytes, a type code, the number of dimensions, then each
  dimension as a big-endian uint32, then the values in big-endian order).
- ``"synthetic"``: a stand-in generated from a seed where neither is at hand: ten random 8x8
  prototypes, each image one of them shifted by up to two pixels, with Gaussian pixel noise
  (standard deviation 0.3, clipped to [0, 1]).

Every source yields :class:`Digits`: images flattened to (N, pixels) float64 in [0, 1] and labels
(N,) int64.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

#: IDX type codes -> numpy big-endian dtypes.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class Digits(NamedTuple):
    """A split of a digit data set: ``x`` (N, pixels) float64 in [0, 1], ``y`` (N,) int64 labels."""

    x: Tensor
    y: Tensor


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip-compressed when its name ends in .gz) into an array of its shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (its first two bytes must be zero)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(IDX_TYPES[code])
    count = int(np.prod(shape)) if shape else 1
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path}: expected {count * dtype.itemsize} bytes of data for shape {shape}, got {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: str, name: str) -> str:
    for candidate in (name, name + ".gz", name.replace("-idx", ".idx"), name.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"--data {folder}: no {name} (or {name}.gz) in that folder")


def load_idx_folder(folder: str) -> tuple:
    """(train, test) :class:`Digits` from MNIST's four IDX files in ``folder``; pixels scaled by 1/255."""
    arrays = {key: read_idx(_find(folder, name)) for key, name in MNIST_FILES.items()}
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"--data {folder}: {split} images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in number"
            )
        x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float64) / 255.0)
        out.append(Digits(x, torch.from_numpy(labels.astype(np.int64))))
    return tuple(out)


def load_sklearn_digits(seed: int, n_test: int = 300) -> tuple:
    """(train, test) :class:`Digits` from scikit-learn's 8x8 digits, split by a permutation from ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "--data digits needs scikit-learn (pip install scikit-learn); or give --data DIR "
            "with MNIST's IDX files, or --data synthetic"
        ) from None
    bunch = load_digits()
    return _split(bunch.data / 16.0, bunch.target, seed, n_test)


def make_synthetic(seed: int, count: int = 1797, n_test: int = 300, side: int = 8, noise: float = 0.3) -> tuple:
    """(train, test) :class:`Digits` of a seeded stand-in for the 8x8 digits (see the module docstring)."""
    rng = np.random.default_rng(seed)
    prototypes = (rng.random((10, side + 2, side + 2)) < 0.35).astype(np.float64)
    labels = rng.integers(0, 10, count)
    dx, dy = rng.integers(0, 3, count), rng.integers(0, 3, count)  # offsets 0..2 in a (side+2)^2 prototype
    images = np.stack([prototypes[c, a : a + side, b : b + side] for c, a, b in zip(labels, dx, dy)])
    images = np.clip(images + rng.normal(0.0, noise, images.shape), 0.0, 1.0)
    return _split(images.reshape(count, -1), labels, seed, n_test)


def _split(x: np.ndarray, y: np.ndarray, seed: int, n_test: int) -> tuple:
    order = np.random.default_rng(seed).permutation(x.shape[0])
    x, y = (
        torch.from_numpy(np.asarray(x, dtype=np.float64)[order]),
        torch.from_numpy(np.asarray(y, dtype=np.int64)[order]),
    )
    return Digits(x[n_test:], y[n_test:]), Digits(x[:n_test], y[:n_test])


def load(source: str, seed: int = 0) -> tuple:
    """(train, test) :class:`Digits` from ``source``: "digits", "synthetic" or a folder of IDX files."""
    if source == "digits":
        return load_sklearn_digits(seed)
    if source == "synthetic":
        return make_synthetic(seed)
    if os.path.isdir(source):
        return load_idx_folder(source)
    raise ValueError(f"--data must be 'digits', 'synthetic' or a folder of MNIST IDX files, got {source!r}")
