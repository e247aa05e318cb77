"""The language-modelling corpora of the paper: where to get them and how to cut them into train/valid/test.

Every ``prepare_*`` function turns a downloaded archive (or a local text) into ``out_dir/train.txt``,
``valid.txt`` and ``test.txt`` -- the input of tools/preprocess_data.py -- streaming, so a 1.8 GB archive
never sits in memory.  The splits are the standard ones:

* enwik8: the 100,000,000 bytes of ``enwik8`` cut at bytes 90M and 95M (the Transformer-XL / Al-Rfou split);
* text8: the 100,000,000 characters of ``text8`` cut the same way (one ASCII line, so bytes = characters);
* WikiText-103: the archive's ``wiki.train/valid/test`` files, tokenized (``.tokens``) or raw (``.raw``);
* lm1b: the 99 training shards (in archive order) as train; two *different* held-out shards as valid and
  test (default: test = heldout 00000, the benchmark's test set; valid = heldout 00001).  The seed
  code evaluated on the same shard for both, which makes model selection on valid peek at test.
* a local file or folder: cut by ``ratios`` of its bytes, each cut moved forward to the next line end.

Split sizes are parameters so that small archives in the real layout exercise the same code in tests.
"""
from __future__ import annotations

import os
import re
import tarfile
import zipfile
import zlib
from typing import Dict, Iterator, List, Sequence, Tuple

from .download import RemoteFile
from .errors import DataError, require_file, require_text_file

SPLITS = ("train", "valid", "test")
STANDARD_SPLIT_BYTES = (90_000_000, 5_000_000, 5_000_000)
CHUNK = 1 << 20

# Digests: WikiText from torchtext and other loaders that check them; lm1b from tensorflow-datasets'
# url_checksums.  No digest of enwik8.zip/text8.zip is published by their host; their sizes are the
# well-known ones and the zip's own CRC-32 is checked on extraction.  --md5/--sha256 pin any file.
CATALOG: Dict[str, RemoteFile] = {
    "enwik8": RemoteFile("enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip", size=36_445_475),
    "text8": RemoteFile("text8.zip", "http://mattmahoney.net/dc/text8.zip", size=31_344_016),
    "wikitext-103": RemoteFile("wikitext-103-v1.zip",
                               "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
                               md5="9ddaacaf6af0710eda8c456decff7832"),
    "wikitext-103-raw": RemoteFile("wikitext-103-raw-v1.zip",
                                   "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip",
                                   md5="0ca3512bd7a238be4a63ce7b434f8935"),
    "lm1b": RemoteFile("1-billion-word-language-modeling-benchmark-r13output.tar.gz",
                       "http://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz",
                       size=1_792_209_805,
                       sha256="01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e"),
}

_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError)


def _corrupt(path: str, e: Exception) -> DataError:
    return DataError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}): delete it and re-run "
                     f"tools/get_data.py to download it again")


def _split_paths(out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    return [os.path.join(out_dir, f"{s}.txt") for s in SPLITS]


def parse_sizes(text: str) -> Tuple[int, int, int]:
    """``"90000000,5000000,5000000"`` -> three positive byte counts."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise DataError(f"--split-bytes {text!r} must be three positive integers 'train,valid,test'")
    return sizes


def parse_ratios(text: str) -> Tuple[float, float, float]:
    """``"0.9,0.05,0.05"`` -> three fractions summing to 1; train's positive, valid's or test's may be 0 (that split
    is not written: a run without a test split, or without validation)."""
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        ratios = ()
    if len(ratios) != 3 or min(ratios) < 0 or ratios[0] <= 0:
        raise DataError(f"--split {text!r} must be three fractions 'train,valid,test' like 0.9,0.05,0.05 (train "
                        f"positive; valid or test may be 0 to write no such split)")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise DataError(f"--split {text!r} sums to {sum(ratios):g}, not 1: make the three fractions add up to 1")
    return ratios


def _open_zip(path: str) -> zipfile.ZipFile:
    require_file(path, "archive", "run tools/get_data.py to download it")
    try:
        return zipfile.ZipFile(path)
    except _ARCHIVE_ERRORS as e:
        raise _corrupt(path, e) from None


def _member(z: zipfile.ZipFile, path: str, name: str) -> zipfile.ZipInfo:
    try:
        return z.getinfo(name)
    except KeyError:
        raise DataError(f"{path} has no member {name!r} (it has {z.namelist()[:5]}): is it the right archive?") from None


def split_zip_member_by_bytes(zip_path: str, member: str, out_dir: str,
                              sizes: Sequence[int] = STANDARD_SPLIT_BYTES) -> List[str]:
    """Write the first ``sizes[0]`` bytes of ``member`` to train.txt, the next ``sizes[1]`` to valid.txt, the next
    ``sizes[2]`` to test.txt.  The whole member is read, so the zip's CRC-32 check covers it."""
    outs = _split_paths(out_dir)
    with _open_zip(zip_path) as z:
        info = _member(z, zip_path, member)
        if info.file_size < sum(sizes):
            raise DataError(f"{zip_path}:{member} has {info.file_size} bytes, fewer than the {sum(sizes)} the split "
                            f"{','.join(map(str, sizes))} needs: give smaller --split-bytes or the full archive")
        try:
            with z.open(info) as src:
                for out, n in zip(outs, sizes):
                    with open(out, "wb") as dst:
                        while n:
                            block = src.read(min(CHUNK, n))
                            if not block:
                                raise EOFError("member ended early")
                            dst.write(block)
                            n -= len(block)
                while src.read(CHUNK):  # drain: zipfile checks the CRC at the member's end
                    pass
        except _ARCHIVE_ERRORS as e:
            raise _corrupt(zip_path, e) from None
    return outs


def prepare_enwik8(zip_path: str, out_dir: str, sizes: Sequence[int] = STANDARD_SPLIT_BYTES) -> List[str]:
    return split_zip_member_by_bytes(zip_path, "enwik8", out_dir, sizes)


def prepare_text8(zip_path: str, out_dir: str, sizes: Sequence[int] = STANDARD_SPLIT_BYTES) -> List[str]:
    return split_zip_member_by_bytes(zip_path, "text8", out_dir, sizes)


def prepare_wikitext103(zip_path: str, out_dir: str, raw: bool = False) -> List[str]:
    """Copy ``wikitext-103[-raw]/wiki.<split>.tokens|raw`` out of the archive as ``<split>.txt``."""
    folder, ext = ("wikitext-103-raw", "raw") if raw else ("wikitext-103", "tokens")
    outs = _split_paths(out_dir)
    with _open_zip(zip_path) as z:
        infos = [_member(z, zip_path, f"{folder}/wiki.{s}.{ext}") for s in SPLITS]
        try:
            for info, out in zip(infos, outs):
                with z.open(info) as src, open(out, "wb") as dst:
                    for block in iter(lambda: src.read(CHUNK), b""):
                        dst.write(block)
        except _ARCHIVE_ERRORS as e:
            raise _corrupt(zip_path, e) from None
    return outs


LM1B_TOP = "1-billion-word-language-modeling-benchmark-r13output"
_LM1B_TRAIN = re.compile(r"(^|/)training-monolingual\.tokenized\.shuffled/news\.en-\d{5}-of-\d{5}$")
_LM1B_HELDOUT = re.compile(r"(^|/)heldout-monolingual\.tokenized\.shuffled/news\.en\.heldout-(\d{5})-of-\d{5}$")


def check_lm1b_shards(valid_shard: int, test_shard: int) -> None:
    for s in (valid_shard, test_shard):
        if not 0 <= s < 50:
            raise DataError(f"lm1b held-out shard {s} does not exist: choose shards 0-49")
    if valid_shard == test_shard:
        raise DataError(f"--lm1b-valid-shard and --lm1b-test-shard are both {valid_shard}: validation and test must "
                        f"be different held-out shards (the standard test set is shard 0)")


def prepare_lm1b(tar_path: str, out_dir: str, valid_shard: int = 1, test_shard: int = 0) -> List[str]:
    """Training shards -> train.txt (concatenated in archive order); held-out shard ``valid_shard`` ->
    valid.txt and a *different* held-out shard ``test_shard`` -> test.txt.  One pass over the .tar.gz."""
    check_lm1b_shards(valid_shard, test_shard)
    require_file(tar_path, "archive", "run tools/get_data.py to download it")
    outs = _split_paths(out_dir)
    n_train, found = 0, set()
    try:
        with tarfile.open(tar_path, "r|gz") as tar, open(outs[0], "wb") as train:
            for m in tar:
                if not m.isfile():
                    continue
                target = None
                if _LM1B_TRAIN.search(m.name):
                    target, n_train = train, n_train + 1
                else:
                    h = _LM1B_HELDOUT.search(m.name)
                    if h and int(h.group(2)) in (valid_shard, test_shard):
                        shard = int(h.group(2))
                        found.add(shard)
                        target = open(outs[1] if shard == valid_shard else outs[2], "wb")
                if target is None:
                    continue
                src = tar.extractfile(m)
                for block in iter(lambda: src.read(CHUNK), b""):
                    target.write(block)
                if target is not train:
                    target.close()
    except _ARCHIVE_ERRORS as e:
        raise _corrupt(tar_path, e) from None
    if n_train == 0:
        raise DataError(f"{tar_path} holds no training shards ({LM1B_TOP}/training-monolingual.tokenized.shuffled/"
                        f"news.en-*): is it the lm1b r13output archive?")
    missing = sorted({valid_shard, test_shard} - found)
    if missing:
        raise DataError(f"{tar_path} has no held-out shard(s) {missing} (heldout-monolingual.tokenized.shuffled/"
                        f"news.en.heldout-NNNNN-of-00050): choose shards 0-49 with --lm1b-valid-shard/--lm1b-test-shard")
    return outs


def _local_files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))
        if not files:
            raise DataError(f"folder {path} holds no files: give a text file or a folder of text files")
    else:
        files = [path]
    for f in files:
        require_text_file(f, what="corpus file", fix="give UTF-8 text files (one document or sentence per line)")
    return files


def _concatenated(files: Sequence[str]) -> Iterator[bytes]:
    """The files back to back, with a line end added after a file that lacks one (files never share a line)."""
    for p in files:
        last = b"\n"
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                yield block
                last = block[-1:]
        if last != b"\n":
            yield b"\n"


def _concatenated_size(path: str) -> int:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return os.path.getsize(path) + (f.read(1) != b"\n")


def prepare_local(path: str, out_dir: str, ratios: Sequence[float] = (0.9, 0.05, 0.05)) -> List[str]:
    """Split a text file, or a folder of them (sorted by path), by ``ratios`` of its bytes.

    Cut i falls after the line holding byte ``round((r_0 + ... + r_i) * N) - 1``, so no line is split.  A split
    of ratio 0 is not written (and an earlier ``<split>.txt`` of ``out_dir`` is removed, so that preprocessing
    the folder does not pick it up).  Returns the files written.
    """
    parse_ratios(",".join(map(str, ratios)))
    files = _local_files(path)
    total = sum(_concatenated_size(f) for f in files)
    bounds = [round(ratios[0] * total), round((ratios[0] + ratios[1]) * total)]
    outs = _split_paths(out_dir)
    fhs = [open(o, "wb") for o in outs]
    try:
        idx, pos = 0, 0
        for block in _concatenated(files):
            while block:
                if idx == 2 or pos + len(block) < bounds[idx]:
                    fhs[idx].write(block)
                    pos += len(block)
                    break
                j = block.find(b"\n", max(0, bounds[idx] - 1 - pos))
                if j < 0:
                    fhs[idx].write(block)
                    pos += len(block)
                    break
                fhs[idx].write(block[:j + 1])
                pos += j + 1
                block = block[j + 1:]
                idx += 1
                while idx < 2 and ratios[idx] == 0:  # an empty split: straight on to the next
                    idx += 1
    finally:
        for fh in fhs:
            fh.close()
    written = []
    for name, out, r in zip(SPLITS, outs, ratios):
        if r == 0:
            os.remove(out)
            continue
        if os.path.getsize(out) == 0:
            raise DataError(f"the {name} split of {path} would be empty ({total} bytes split {','.join(map(str, ratios))} "
                            f"at line ends): give a larger corpus (more lines) or other --split fractions")
        written.append(out)
    return written
