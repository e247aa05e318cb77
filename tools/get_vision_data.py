#!/usr/bin/env python
"""Download the image-classification sets that train_vision.py reads.

    python tools/get_vision_data.py cifar10      # -> data/cifar10/cifar-10-batches-py/
    python tools/get_vision_data.py cifar100     # -> data/cifar100/cifar-100-python/
    python tools/get_vision_data.py stl10        # -> data/stl10/stl10_binary/   (2.6 GB archive)
    python tools/get_vision_data.py svhn         # -> data/svhn/{train,test}_32x32.mat  (--svhn-extra: + extra)

then ``train_vision.py --dataset cifar10 --data-path data/cifar10 --image-size 32``.  Downloads go to
<data-dir>/downloads/, resume where they stopped (vqmoe_ds.data.download: HTTP Range on a .part file) and are
checked against the published md5 (and size where known) before use; --base-url fetches <base-url>/<file name>
from a mirror, --md5 pins a different file.  Archives are unpacked with tarfile's "data" filter (no absolute
paths, no links out of the folder).  ImageNet needs a login: lay its images out as ROOT/train/<class>/ and
ROOT/val/<class>/ and use --dataset folder.
"""
import argparse
import os
import sys
import tarfile


from vqmoe_ds.data.download import RemoteFile, download  # noqa: E402
from vqmoe_ds.data.errors import DataError  # noqa: E402

# published by the dataset pages (md5s as listed there and used by torchvision)
CATALOG = {
    "cifar10": [RemoteFile("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                           size=170498071, md5="c58f30108f718f92721af3b95e74349a")],
    "cifar100": [RemoteFile("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            size=169001437, md5="eb9058c3a382ffc7106e4002c42a8d85")],
    "stl10": [RemoteFile("stl10_binary.tar.gz", "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                         md5="91f7769df0f17e558f3565bffb0c7dfb")],
    "svhn": [RemoteFile("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                        size=182040794, md5="e26dedcc434d2e4c54c9b2d4a06d8373"),
             RemoteFile("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                        size=64275384, md5="eb5a983be6a315427106f1b164d9cef3")],
}
SVHN_EXTRA = RemoteFile("extra_32x32.mat", "http://ufldl.stanford.edu/housenumbers/extra_32x32.mat",
                        md5="a93ce644f1a588dc4d68dda5feec44a7")
# what each archive must unpack to (checked after extraction)
EXPECT = {"cifar10": "cifar-10-batches-py/test_batch", "cifar100": "cifar-100-python/test",
          "stl10": "stl10_binary/test_X.bin"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(CATALOG))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--base-url", help="fetch <base-url>/<file name> instead of the official URL")
    p.add_argument("--md5", help="expected md5 of the (single) file, replacing the built-in check")
    p.add_argument("--svhn-extra", action="store_true", help="svhn: also the 531k-image extra_32x32.mat (1.3 GB)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def extract(archive: str, out_dir: str) -> None:
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(out_dir, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot unpack {archive} ({type(e).__name__}: {e}): delete it and re-run") from None


def run(args) -> str:
    files = list(CATALOG[args.dataset]) + ([SVHN_EXTRA] if args.dataset == "svhn" and args.svhn_extra else [])
    if args.md5 and len(files) > 1:
        raise DataError(f"--md5 pins one file but {args.dataset} has {len(files)}: drop --md5 (or use --base-url alone)")
    out_dir = os.path.join(args.data_dir, args.dataset)
    for rf in files:
        url = args.base_url.rstrip("/") + "/" + rf.filename if args.base_url else rf.url
        dest = os.path.join(args.data_dir, "downloads", rf.filename) if args.dataset in EXPECT else \
            os.path.join(out_dir, rf.filename)
        got = download(url, dest, size=None if args.md5 else rf.size, md5=args.md5 or rf.md5, timeout=args.timeout,
                       progress=not args.no_progress)
        if args.dataset in EXPECT:
            extract(got, out_dir)
            if not os.path.isfile(os.path.join(out_dir, EXPECT[args.dataset])):
                raise DataError(f"{got} unpacked without {EXPECT[args.dataset]}: it is not the {args.dataset} "
                                f"archive; delete it and re-run")
    return out_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.dataset}: {out}  (train_vision.py --dataset {args.dataset} --data-path {out})")
    return 0


def cli() -> None:
    """The console script ``vqmoe-get-vision-data`` (setup.py)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
