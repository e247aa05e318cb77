"""tools/get_vision_data.py against a loopback HTTP server (the data tests' server, with HTTP Range): CIFAR-10
archive in its real layout downloaded, resumed after a dropped connection, checked, unpacked and readable by
the reader; SVHN's two .mat files; a wrong checksum and a path-escaping archive are one-line errors."""
import hashlib
import importlib.util
import io
import os
import tarfile

import numpy as np

from test_data_get import server  # noqa: F401  (fixture: the loopback server with Range support)
from test_vision_datasets import write_cifar10
from vqmoe_ds.vision.datasets import read_cifar10, read_svhn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("_get_vision_data", os.path.join(ROOT, "tools", "get_vision_data.py"))
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def _tar_of(folder, arc_root):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(os.path.join(folder, arc_root), arcname=arc_root)
    return buf.getvalue()


def _run(server, tmp_path, *args):  # noqa: F811
    return tool.main([*args, "--data-dir", str(tmp_path / "data"), "--base-url", server.base_url, "--no-progress",
                      "--timeout", "10"])


def test_cifar10_download_resume_unpack_read(server, tmp_path, capsys):  # noqa: F811
    src = tmp_path / "src"
    truth = write_cifar10(str(src), per_batch=2)
    server.files["cifar-10-python.tar.gz"] = blob = _tar_of(str(src), "cifar-10-batches-py")
    server.break_after["cifar-10-python.tar.gz"] = len(blob) // 3  # the first try drops after a third
    md5 = hashlib.md5(blob).hexdigest()
    assert _run(server, tmp_path, "cifar10", "--md5", md5) == 2
    assert "broke off" in capsys.readouterr().err
    assert _run(server, tmp_path, "cifar10", "--md5", md5) == 0
    assert server.requests[-1] == ("cifar-10-python.tar.gz", f"bytes={len(blob) // 3}-")  # resumed
    data = read_cifar10(str(tmp_path / "data" / "cifar10"), "test")
    np.testing.assert_array_equal(data.images, truth["test_batch"][0])
    n = len(server.requests)
    assert _run(server, tmp_path, "cifar10", "--md5", md5) == 0 and len(server.requests) == n  # verified, kept


def test_wrong_checksum_and_unsafe_archive(server, tmp_path, capsys):  # noqa: F811
    server.files["cifar-100-python.tar.gz"] = b"not the archive"
    assert _run(server, tmp_path, "cifar100", "--md5", "0" * 32) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum mismatch" in err[0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    server.files["stl10_binary.tar.gz"] = blob = buf.getvalue()
    assert _run(server, tmp_path, "stl10", "--md5", hashlib.md5(blob).hexdigest()) == 2
    assert "cannot unpack" in capsys.readouterr().err
    assert not (tmp_path / "data" / "escape.txt").exists()


def test_svhn_two_mat_files(server, tmp_path, monkeypatch):  # noqa: F811
    from scipy.io import savemat

    files = {}
    for split, n in (("train", 3), ("test", 2)):
        path = tmp_path / f"{split}.mat"
        savemat(str(path), {"X": np.full((32, 32, 3, n), 7, np.uint8), "y": np.arange(1, n + 1).reshape(-1, 1)})
        files[f"{split}_32x32.mat"] = path.read_bytes()
    server.files.update(files)
    # the catalog's real sizes/md5s replaced by these files' (the published ones belong to the real files)
    cat = [tool.RemoteFile(name, "unused", size=len(b), md5=hashlib.md5(b).hexdigest()) for name, b in files.items()]
    monkeypatch.setitem(tool.CATALOG, "svhn", cat)
    assert _run(server, tmp_path, "svhn") == 0
    s = read_svhn(str(tmp_path / "data" / "svhn"), "train")
    assert s.labels.tolist() == [1, 2, 3] and (s.images == 7).all()
