"""Each reader against small files this test writes in the dataset's real format (pixel layout, label
conventions, class names), the one-line errors on broken files, the restricted unpickler, and the synthetic
task's determinism and signal."""
import os
import pickle

import numpy as np
import pytest

from vqmoe_ds.data.errors import DataError
from vqmoe_ds.vision.datasets import (FolderImages, load_dataset, read_cifar10, read_cifar100, read_image_folder,
                                      read_stl10, read_svhn, synthetic)


def images_hwc(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def cifar_rows(imgs):
    """The CIFAR row layout, written out by hand: 1024 R values (row-major), then 1024 G, then 1024 B."""
    rows = np.zeros((len(imgs), 3072), dtype=np.uint8)
    for i, im in enumerate(imgs):
        for c in range(3):
            for r in range(32):
                for col in range(32):
                    rows[i, c * 1024 + r * 32 + col] = im[r, col, c]
    return rows


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the published files


def write_cifar10(root, per_batch=3):
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(os.path.join(d, "batches.meta"), {b"label_names": names, b"num_vis": 3072})
    truth = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        imgs = images_hwc(per_batch, 32, i)
        labels = [(i + j) % 10 for j in range(per_batch)]
        dump(os.path.join(d, name), {b"batch_label": name.encode(), b"labels": labels, b"data": cifar_rows(imgs),
                                     b"filenames": [b"x.png"] * per_batch})
        truth[name] = (imgs, labels)
    return truth


def test_cifar10(tmp_path):
    truth = write_cifar10(str(tmp_path))
    train = read_cifar10(str(tmp_path), "train")
    assert train.images.shape == (15, 32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images[3:6], truth["data_batch_2"][0])
    assert train.labels.tolist() == sum((truth[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    test = load_dataset("cifar10", str(tmp_path), "test", image_size=32)
    np.testing.assert_array_equal(test.images, truth["test_batch"][0])
    assert test.class_names[1] == "automobile" and test.num_classes == 10
    with pytest.raises(DataError, match="images are 32x32 but the model expects 16x16: set --image-size 32"):
        load_dataset("cifar10", str(tmp_path), "train", image_size=16)


def test_cifar10_broken_files(tmp_path):
    write_cifar10(str(tmp_path))
    d = os.path.join(str(tmp_path), "cifar-10-batches-py")
    os.remove(os.path.join(d, "data_batch_4"))
    with pytest.raises(DataError, match=r"data_batch_4 does not exist: download it with tools/get_vision_data.py"):
        read_cifar10(str(tmp_path), "train")
    dump(os.path.join(d, "data_batch_4"), {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"expected uint8 \[n, 3072\]"):
        read_cifar10(str(tmp_path), "train")
    dump(os.path.join(d, "data_batch_4"), {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]})
    with pytest.raises(DataError, match=r"labels span 0..12, expected 0..9"):
        read_cifar10(str(tmp_path), "train")

    class Evil:  # a pickle that would run a command on load
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    dump(os.path.join(d, "data_batch_4"), {b"data": Evil(), b"labels": []})
    with pytest.raises(DataError, match=r"not a CIFAR python pickle \(UnpicklingError: .*system is not allowed\)"):
        read_cifar10(str(tmp_path), "train")
    with open(os.path.join(d, "data_batch_4"), "wb") as f:
        f.write(b"this is not a pickle")
    with pytest.raises(DataError, match="not a CIFAR python pickle"):
        read_cifar10(str(tmp_path), "train")


def test_cifar100_fine_labels(tmp_path):
    d = os.path.join(str(tmp_path), "cifar-100-python")
    os.makedirs(d)
    fine = [f"fine{i}".encode() for i in range(100)]
    dump(os.path.join(d, "meta"), {b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20})
    imgs = images_hwc(4, 32, 5)
    dump(os.path.join(d, "train"), {b"data": cifar_rows(imgs), b"fine_labels": [99, 0, 42, 7],
                                    b"coarse_labels": [19, 0, 3, 2]})
    dump(os.path.join(d, "test"), {b"data": cifar_rows(imgs[:2]), b"fine_labels": [5, 6], b"coarse_labels": [1, 1]})
    train = read_cifar100(str(tmp_path), "train")
    np.testing.assert_array_equal(train.images, imgs)
    assert train.labels.tolist() == [99, 0, 42, 7] and train.class_names[42] == "fine42" and train.num_classes == 100
    assert read_cifar100(str(tmp_path), "test").labels.tolist() == [5, 6]
    assert read_cifar100(str(tmp_path), "train", label="coarse").labels.tolist() == [19, 0, 3, 2]


def write_stl10(d, split, imgs, labels_1based):
    os.makedirs(d, exist_ok=True)
    # column-major per image, spelled out: for each channel, for each column, for each row
    buf = bytearray()
    for im in imgs:
        for c in range(3):
            for col in range(96):
                buf += bytes(im[:, col, c].tolist())
    with open(os.path.join(d, f"{split}_X.bin"), "wb") as f:
        f.write(bytes(buf))
    with open(os.path.join(d, f"{split}_y.bin"), "wb") as f:
        f.write(bytes(labels_1based))


def test_stl10(tmp_path):
    d = os.path.join(str(tmp_path), "stl10_binary")
    imgs = images_hwc(3, 96, 9)
    write_stl10(d, "train", imgs, [1, 10, 4])
    with open(os.path.join(d, "class_names.txt"), "w") as f:
        f.write("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    s = read_stl10(str(tmp_path), "train")
    np.testing.assert_array_equal(s.images, imgs)
    assert s.labels.tolist() == [0, 9, 3] and s.class_names[9] == "truck"
    with open(os.path.join(d, "train_X.bin"), "ab") as f:
        f.write(b"\x00" * 10)  # truncated / extra bytes
    with pytest.raises(DataError, match="not a multiple of 3x96x96=27648"):
        read_stl10(str(tmp_path), "train")
    write_stl10(d, "test", imgs, [0, 1, 2])
    with pytest.raises(DataError, match=r"labels span 0..2, STL-10's are 1..10"):
        read_stl10(str(tmp_path), "test")


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    imgs = images_hwc(4, 32, 11)
    savemat(os.path.join(str(tmp_path), "train_32x32.mat"),
            {"X": np.ascontiguousarray(imgs.transpose(1, 2, 3, 0)), "y": np.array([[10], [1], [9], [10]], np.uint8)},
            format="5")
    s = read_svhn(str(tmp_path), "train")
    np.testing.assert_array_equal(s.images, imgs)
    assert s.labels.tolist() == [0, 1, 9, 0]  # 10 is the digit 0
    with pytest.raises(DataError, match="test_32x32.mat does not exist"):
        read_svhn(str(tmp_path), "test")
    savemat(os.path.join(str(tmp_path), "test_32x32.mat"), {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                            "y": np.array([[1], [2], [3]])})
    with pytest.raises(DataError, match="2 images but 3 labels"):
        read_svhn(str(tmp_path), "test")


def test_image_folder_png_jpeg_npy(tmp_path):
    from PIL import Image

    root = str(tmp_path)
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "dog"))):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
    red = np.zeros((20, 30, 3), np.uint8)
    red[..., 0] = 200
    Image.fromarray(red).save(os.path.join(root, "train", "cat", "a.png"))
    grey = np.full((16, 16), 77, np.uint8)
    np.save(os.path.join(root, "train", "dog", "b.npy"), grey)
    Image.fromarray(np.full((16, 16, 3), 30, np.uint8)).save(os.path.join(root, "train", "dog", "c.jpg"), quality=95)
    Image.fromarray(red).save(os.path.join(root, "val", "dog", "d.png"))
    train = read_image_folder(root, "train", image_size=16)
    assert train.class_names == ["cat", "dog"] and train.labels.tolist() == [0, 1, 1]
    assert isinstance(train.images, FolderImages)
    x = train.images[np.array([0, 1, 2])]
    assert x.shape == (3, 16, 16, 3) and x.dtype == np.uint8
    assert (x[0, ..., 0] == 200).all() and (x[0, ..., 1:] == 0).all()  # resized 20x30 -> 16x16, colour kept
    assert (x[1] == 77).all()  # .npy grey -> 3 channels
    assert np.abs(x[2].astype(int) - 30).max() <= 3  # JPEG, lossy
    val = load_dataset("folder", root, "test", image_size=16, class_names=train.class_names)
    assert val.labels.tolist() == [1]
    np.save(os.path.join(root, "train", "dog", "bad.npy"), np.zeros((4, 4, 5), np.float32))
    with pytest.raises(DataError, match=r"bad.npy: float32 \[4, 4, 5\], expected a uint8 image"):
        read_image_folder(root, "train", 16).images[np.array([2])]
    os.makedirs(os.path.join(root, "val", "bird"))
    with pytest.raises(DataError, match="class folders the train split lacks \\(bird\\)"):
        read_image_folder(root, "test", 16, class_names=train.class_names)
    with pytest.raises(DataError, match="has no train folder"):
        read_image_folder(os.path.join(root, "train"), "train", 16)


def test_synthetic_is_deterministic_and_learnable_by_its_definition():
    a = synthetic(512, 16, 8, seed=3, split="train")
    b = synthetic(512, 16, 8, seed=3, split="train")
    c = synthetic(512, 16, 8, seed=3, split="test")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (512, 16, 16, 3) and sorted(set(a.labels.tolist())) == list(range(8))
    # the blob colour is the class's: the reddest pixel is far redder in "red" classes (0-3) than "blue" (4-7)
    x = a.images.astype(int)
    redness = (x[..., 0] - x[..., 2]).reshape(len(x), -1).max(1)
    assert redness[a.labels < 4].min() > redness[a.labels >= 4].max()
    with pytest.raises(DataError, match="choose 4, 8 or 12"):
        synthetic(10, 16, 10)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", str(tmp_path))
    with pytest.raises(DataError, match="--dataset cifar10 needs --data-path"):
        load_dataset("cifar10", None)
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset("svhn", str(tmp_path / "nope"))
