"""Image classification sets: readers for the files the datasets ship as, and a synthetic task.

Every reader returns an `ImageSet`: ``images`` uint8 [N, H, W, C] (a numpy array, or `FolderImages`, which
decodes on access and answers the same ``images[idx]``), ``labels`` int64 [N] in 0..K-1, ``class_names``.

  * CIFAR-10  (``cifar-10-batches-py/``): python pickles ``data_batch_1..5``, ``test_batch`` (dict with
    ``data`` uint8 [n, 3072] = R plane, G plane, B plane, row-major 32x32; ``labels``), ``batches.meta``.
  * CIFAR-100 (``cifar-100-python/``): pickles ``train``, ``test`` (``fine_labels`` / ``coarse_labels``), ``meta``.
  * STL-10    (``stl10_binary/``): ``{train,test}_X.bin`` uint8, each image 3x96x96 stored *column-major*
    (channel, then column, then row), ``{train,test}_y.bin`` uint8 labels 1..10, ``class_names.txt``.
  * SVHN      (``train_32x32.mat``, ``test_32x32.mat``, MATLAB v5): ``X`` [32, 32, 3, N], ``y`` [N, 1] with
    10 meaning the digit 0.  Read with ``scipy.io.loadmat`` (scipy is needed for SVHN only).
  * folder    (ImageNet style): ``ROOT/train/<class>/<image>``, ``ROOT/val/<class>/...`` (or ``test``); PNG/JPEG
    decoded with Pillow (installed with matplotlib), ``.npy`` arrays [H, W, 3] or [H, W] uint8 always; resized
    to ``image_size`` (shorter side, then centre crop).
  * synthetic: see `synthetic`.

Why pickles are read with a restricted unpickler: a pickle can run any code on load; CIFAR's need only
numpy's array reconstruction, so nothing else is allowed.  Every malformed file is a one-line `DataError`
naming the file, what is wrong and the fix, raised before any training step.
"""
from __future__ import annotations

import os
import pickle
import typing
from dataclasses import dataclass
from typing import List, Literal, Sequence

import numpy as np

from ..data.errors import DataError, require_file

Dataset = Literal["synthetic", "cifar10", "cifar100", "stl10", "svhn", "folder"]
DATASETS = typing.get_args(Dataset)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "svhn": 10}
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "svhn": 32}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".npy")


@dataclass
class ImageSet:
    images: object  # uint8 [N, H, W, C]: np.ndarray or FolderImages
    labels: np.ndarray  # int64 [N]
    class_names: List[str]

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels: the files do not belong together")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        imgs = self.images.subset(idx) if isinstance(self.images, FolderImages) else self.images[idx]
        return ImageSet(imgs, self.labels[idx], self.class_names)


# ---- CIFAR ----------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return super().find_class(module, name)


def _load_pickle(path: str, fix: str) -> dict:
    require_file(path, "CIFAR file", fix)
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 -- any failure here means "not a CIFAR pickle"
        raise DataError(f"{path} is not a CIFAR python pickle ({type(e).__name__}: {e}): {fix}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR batch: {fix}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _names(values) -> List[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _cifar_batch(path: str, label_key: str, fix: str):
    d = _load_pickle(path, fix)
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"{path} has no '{key}' entry (keys: {', '.join(sorted(d))}): {fix}")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [n, 3072] (32x32x3): {fix}")
    labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} '{label_key}': {fix}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # planes R, G, B -> HWC


def _cifar_dir(root: str, sub: str) -> str:
    return os.path.join(root, sub) if os.path.isdir(os.path.join(root, sub)) else root


def _check_labels(labels: np.ndarray, k: int, where: str, fix: str) -> np.ndarray:
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"{where}: labels span {labels.min()}..{labels.max()}, expected 0..{k - 1}: {fix}")
    return labels


def read_cifar10(root: str, split: str) -> ImageSet:
    d = _cifar_dir(root, "cifar-10-batches-py")
    fix = "download it with tools/get_vision_data.py cifar10 (python version of CIFAR-10)"
    names = _names(_load_pickle(os.path.join(d, "batches.meta"), fix).get("label_names", []))
    if len(names) != 10:
        raise DataError(f"{os.path.join(d, 'batches.meta')} lists {len(names)} label_names, CIFAR-10 has 10: {fix}")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_cifar_batch(os.path.join(d, f), "labels", fix) for f in files]
    labels = _check_labels(np.concatenate([p[1] for p in parts]), 10, d, fix)
    return ImageSet(np.concatenate([p[0] for p in parts]), labels, names)


def read_cifar100(root: str, split: str, label: str = "fine") -> ImageSet:
    d = _cifar_dir(root, "cifar-100-python")
    fix = "download it with tools/get_vision_data.py cifar100 (python version of CIFAR-100)"
    meta = _load_pickle(os.path.join(d, "meta"), fix)
    names = _names(meta.get(f"{label}_label_names", []))
    k = 100 if label == "fine" else 20
    if len(names) != k:
        raise DataError(f"{os.path.join(d, 'meta')} lists {len(names)} {label}_label_names, expected {k}: {fix}")
    images, labels = _cifar_batch(os.path.join(d, "train" if split == "train" else "test"), f"{label}_labels", fix)
    return ImageSet(images, _check_labels(labels, k, d, fix), names)


# ---- STL-10 ---------------------------------------------------------------------------------------------
def read_stl10(root: str, split: str) -> ImageSet:
    d = _cifar_dir(root, "stl10_binary")
    fix = "download it with tools/get_vision_data.py stl10 (the binary version)"
    x_path = require_file(os.path.join(d, f"{split}_X.bin"), "STL-10 file", fix)
    y_path = require_file(os.path.join(d, f"{split}_y.bin"), "STL-10 file", fix)
    raw = np.fromfile(x_path, dtype=np.uint8)
    per = 3 * 96 * 96
    if raw.size % per:
        raise DataError(f"{x_path} has {raw.size} bytes, not a multiple of 3x96x96={per}: the file is truncated; {fix}")
    # column-major per image: read as [n, channel, column, row], then to [n, row, column, channel]
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(f"{y_path} has {len(labels)} labels for {len(images)} images in {x_path}: {fix}")
    if len(labels) and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{y_path}: labels span {labels.min()}..{labels.max()}, STL-10's are 1..10: {fix}")
    names_path = os.path.join(d, "class_names.txt")
    names = open(names_path).read().split() if os.path.isfile(names_path) else [str(i) for i in range(10)]
    return ImageSet(images, labels - 1, names)


# ---- SVHN -----------------------------------------------------------------------------------------------
def read_svhn(root: str, split: str) -> ImageSet:
    fix = "download it with tools/get_vision_data.py svhn (the cropped-digits train/test_32x32.mat)"
    path = require_file(os.path.join(root, f"{split}_32x32.mat"), "SVHN file", fix)
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading SVHN's .mat files needs scipy: pip install scipy") from None
    try:
        m = loadmat(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path} is not a MATLAB v5 file ({type(e).__name__}: {e}): {fix}") from None
    if "X" not in m or "y" not in m:
        raise DataError(f"{path} has no 'X' and 'y' variables: {fix}")
    X, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1).astype(np.int64)
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.dtype != np.uint8:
        raise DataError(f"{path}: X is {X.dtype} {list(X.shape)}, expected uint8 [32, 32, 3, N]: {fix}")
    if X.shape[3] != len(y):
        raise DataError(f"{path}: {X.shape[3]} images but {len(y)} labels: {fix}")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels span {y.min()}..{y.max()}, SVHN's are 1..10 (10 = digit 0): {fix}")
    return ImageSet(np.ascontiguousarray(X.transpose(3, 0, 1, 2)), y % 10, [str(i) for i in range(10)])


# ---- ImageNet-style folders -----------------------------------------------------------------------------
class FolderImages:
    """Images of a class-folder tree, decoded and resized when indexed (``images[idx]`` -> uint8 [n, S, S, 3])."""

    def __init__(self, paths: Sequence[str], image_size: int):
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> "FolderImages":
        return FolderImages([self.paths[i] for i in np.asarray(idx).reshape(-1)], self.image_size)

    def __getitem__(self, idx) -> np.ndarray:
        return np.stack([self.load(self.paths[i]) for i in np.asarray(idx).reshape(-1)])

    def load(self, path: str) -> np.ndarray:
        S = self.image_size
        if path.lower().endswith(".npy"):
            a = np.load(path, allow_pickle=False)
            if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3)):
                raise DataError(f"{path}: {a.dtype} {list(a.shape)}, expected a uint8 image [H, W, 3] or [H, W]: "
                                f"save images as uint8 arrays")
            a = np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2) if a.ndim == 2 or a.shape[2] == 1 else a
            return _resize_center(a, S)
        from PIL import Image

        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path} cannot be decoded ({type(e).__name__}: {e}): remove or replace the file") from None
        return _resize_center(a, S)


def _resize_center(a_HWC: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bilinear, antialiased), then the centre ``size`` x ``size`` crop."""
    import torch
    import torch.nn.functional as F

    H, W = a_HWC.shape[:2]
    if (H, W) != (size, size):
        s = size / min(H, W)
        h, w = max(size, round(H * s)), max(size, round(W * s))
        t = torch.from_numpy(np.array(a_HWC)).permute(2, 0, 1)[None].float()
        t = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (h - size) // 2, (w - size) // 2
        a_HWC = t[0, :, top:top + size, left:left + size].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return a_HWC


def read_image_folder(root: str, split: str, image_size: int, class_names: Sequence[str] = None) -> ImageSet:
    """``split`` "train" reads ROOT/train; "test" reads ROOT/val, else ROOT/test.  Class ids are the sorted
    folder names of the train split (pass its ``class_names`` when reading test)."""
    cands = ["train"] if split == "train" else ["val", "test"]
    d = next((os.path.join(root, c) for c in cands if os.path.isdir(os.path.join(root, c))), None)
    if d is None:
        raise DataError(f"{root} has no {' or '.join(cands)} folder: lay images out as ROOT/train/<class>/<image> "
                        f"and ROOT/val/<class>/<image>")
    names = list(class_names) if class_names is not None else sorted(
        e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e)))
    if not names:
        raise DataError(f"{d} has no class folders: put each class's images in {d}/<class name>/")
    paths, labels = [], []
    for c, name in enumerate(names):
        cdir = os.path.join(d, name)
        if not os.path.isdir(cdir):
            continue  # a test split may lack a class
        files = sorted(f for f in os.listdir(cdir) if f.lower().endswith(IMAGE_EXTS))
        paths += [os.path.join(cdir, f) for f in files]
        labels += [c] * len(files)
    extra = sorted(e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e)) and e not in names)
    if extra:
        raise DataError(f"{d} has class folders the train split lacks ({', '.join(extra[:3])}): make the class "
                        f"folders of train and val agree")
    if not paths:
        raise DataError(f"{d} holds no {'/'.join(IMAGE_EXTS)} images: put images in {d}/<class name>/")
    return ImageSet(FolderImages(paths, image_size), np.array(labels), names)


# ---- synthetic ------------------------------------------------------------------------------------------
SYN_COLORS = np.array([[1.0, 0.15, 0.1], [0.1, 0.35, 1.0], [0.1, 0.9, 0.2]], dtype=np.float32)
SYN_ANGLES = (0.0, 45.0, 90.0, 135.0)
SYN_SPLITS = {"train": 0, "valid": 1, "test": 2}


def synthetic(n: int, image_size: int = 16, num_classes: int = 8, seed: int = 0, split: str = "train") -> ImageSet:
    """Oriented stripes x coloured blobs, at random places, on a noisy background.

    Class c = (stripe angle ``SYN_ANGLES[c % 4]``, blob colour ``SYN_COLORS[c // 4]``), so ``num_classes`` is
    4, 8 or 12.  Per image, drawn independently: a grey stripe patch (half the image side, random position,
    period 3-5 px, random phase), a Gaussian blob (sigma 1/8 of the side, random centre) in the class colour,
    background grey level and pixel noise (sd 0.08).  Telling the colour needs one pixel; telling the angle
    needs a patch-level filter: a model must learn both.  Deterministic in (seed, split); splits differ.
    Horizontal flips swap 45 and 135 degrees (classes 1 <-> 3): do not flip this set.
    """
    if num_classes not in (4, 8, 12):
        raise DataError(f"synthetic task: num_classes={num_classes}, choose 4, 8 or 12 (4 angles x 1-3 colours)")
    if image_size < 8:
        raise DataError(f"synthetic task: image_size={image_size} is too small for stripes: use 8 or more")
    S = image_size
    rng = np.random.default_rng([seed, SYN_SPLITS[split], 7919])
    labels = rng.integers(0, num_classes, n)
    theta = np.deg2rad(np.array(SYN_ANGLES))[labels % 4]
    yy, xx = np.meshgrid(np.arange(S, dtype=np.float32), np.arange(S, dtype=np.float32), indexing="ij")
    period = rng.uniform(3.0, 5.0, n).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    proj = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * proj / period[:, None, None] + phase[:, None, None])
    P = S // 2
    py, px = rng.integers(0, S - P + 1, n), rng.integers(0, S - P + 1, n)
    inside = ((yy[None] >= py[:, None, None]) & (yy[None] < (py + P)[:, None, None]) &
              (xx[None] >= px[:, None, None]) & (xx[None] < (px + P)[:, None, None]))
    cy, cx = rng.uniform(0, S - 1, n), rng.uniform(0, S - 1, n)
    sigma = S / 8
    blob = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / (2 * sigma ** 2))
    bg = rng.uniform(0.25, 0.45, n).astype(np.float32)
    img = bg[:, None, None, None] + 0.5 * (stripes * inside - 0.5 * inside)[..., None]
    img = img * (1 - blob[..., None]) + blob[..., None] * SYN_COLORS[labels // 4][:, None, None, :]
    img = img + rng.normal(0, 0.08, img.shape)
    images = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    names = [f"{int(SYN_ANGLES[c % 4])}deg-{('red', 'blue', 'green')[c // 4]}" for c in range(num_classes)]
    return ImageSet(images, labels, names)


# ---- one entry point ------------------------------------------------------------------------------------
def load_dataset(name: str, path: str = None, split: str = "train", image_size: int = None, num_classes: int = 8,
                 num_images: int = 4096, seed: int = 0, class_names: Sequence[str] = None) -> ImageSet:
    """``split``: "train" or "test" (and "valid" for synthetic).  ``image_size``: the model's input side; the
    array readers require it to equal the set's native size (resize the files otherwise)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} (--dataset)")
    if name == "synthetic":
        return synthetic(num_images, image_size or 16, num_classes, seed, split)
    if not path:
        raise DataError(f"--dataset {name} needs --data-path (the folder tools/get_vision_data.py {name} wrote)")
    if not os.path.isdir(path):
        raise DataError(f"--data-path {path} is not a folder: give the folder tools/get_vision_data.py {name} wrote")
    if name == "folder":
        return read_image_folder(path, split, image_size or 224, class_names)
    if image_size is not None and image_size != NATIVE_SIZE[name]:
        raise DataError(f"{name} images are {NATIVE_SIZE[name]}x{NATIVE_SIZE[name]} but the model expects "
                        f"{image_size}x{image_size}: set --image-size {NATIVE_SIZE[name]}")
    reader = {"cifar10": read_cifar10, "cifar100": read_cifar100, "stl10": read_stl10, "svhn": read_svhn}[name]
    return reader(path, split)
