"""tools/get_data.py end to end against a loopback HTTP server serving small archives in the real layouts."""
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tool_loader import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


get_data = load_tool("get_data")


class _Server:
    """Serves ``files`` (name -> bytes) on 127.0.0.1 with HTTP Range support; records the requests.

    ``break_after[name] = n``: announce the full length but close the connection after n bytes (a dropped
    download).  ``ignore_range``: answer every request with the whole file (status 200).
    """

    def __init__(self):
        self.files, self.break_after, self.ignore_range, self.requests = {}, {}, False, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = server.break_after.pop(name, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = _Server()
    try:
        yield s
    finally:
        s.close()


def _zip(members, compression=zipfile.ZIP_DEFLATED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _md5(b):
    return hashlib.md5(b).hexdigest()


def _run(server, tmp_path, *args):
    return get_data.main([*args, "--data-dir", str(tmp_path / "data"), "--base-url", server.base_url, "--no-progress",
                          "--timeout", "10"])


def _read(tmp_path, name):
    return [(tmp_path / "data" / name / f"{s}.txt").read_bytes() for s in ("train", "valid", "test")]


ENWIK = bytes((i * 37 + 11) % 256 for i in range(1200))  # not UTF-8 everywhere: byte-level data
TEXT8 = bytes(b"abcdefghijklmnopqrstuvwxyz "[(i * 7) % 27] for i in range(1000))


def test_enwik8_split_by_bytes(server, tmp_path):
    server.files["enwik8.zip"] = z = _zip({"enwik8": ENWIK})
    assert _run(server, tmp_path, "enwik8", "--split-bytes", "900,150,100", "--md5", _md5(z)) == 0
    assert _read(tmp_path, "enwik8") == [ENWIK[:900], ENWIK[900:1050], ENWIK[1050:1150]]
    assert (tmp_path / "data" / "downloads" / "enwik8.zip").read_bytes() == z


def test_text8_split_by_chars(server, tmp_path):
    server.files["text8.zip"] = z = _zip({"text8": TEXT8})
    assert _run(server, tmp_path, "text8", "--split-bytes", "900,50,50", "--sha256", hashlib.sha256(z).hexdigest()) == 0
    assert _read(tmp_path, "text8") == [TEXT8[:900], TEXT8[900:950], TEXT8[950:]]


def test_default_split_needs_the_full_100M(server, tmp_path, capsys):
    server.files["text8.zip"] = z = _zip({"text8": TEXT8})
    assert _run(server, tmp_path, "text8", "--md5", _md5(z)) == 2  # standard 90M/5M/5M split of a 1000-byte member
    assert "fewer than the 100000000" in capsys.readouterr().err


@pytest.mark.parametrize("raw", [False, True])
def test_wikitext103_both_variants(server, tmp_path, raw):
    folder, ext, fn = ("wikitext-103-raw", "raw", "wikitext-103-raw-v1.zip") if raw else \
        ("wikitext-103", "tokens", "wikitext-103-v1.zip")
    content = {s: f" = {s} title = \n\n the {s} text @-@ here <unk> .\n".encode() for s in ("train", "valid", "test")}
    server.files[fn] = z = _zip({f"{folder}/wiki.{s}.{ext}": c for s, c in content.items()})
    name = "wikitext-103-raw" if raw else "wikitext-103"
    assert _run(server, tmp_path, name, "--md5", _md5(z)) == 0
    assert _read(tmp_path, name) == [content["train"], content["valid"], content["test"]]


def _lm1b_tar(shards, heldout, truncate=None):
    top = "1-billion-word-language-modeling-benchmark-r13output"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        add(f"{top}/README", b"readme\n")
        for i, d in shards.items():
            add(f"{top}/training-monolingual.tokenized.shuffled/news.en-{i:05d}-of-00100", d)
        for i, d in heldout.items():
            add(f"{top}/heldout-monolingual.tokenized.shuffled/news.en.heldout-{i:05d}-of-00050", d)
    b = buf.getvalue()
    return b if truncate is None else b[:truncate]


def test_lm1b_valid_and_test_are_different_heldout_shards(server, tmp_path):
    shards = {1: b"train one .\n", 2: b"train two .\n"}
    heldout = {0: b"held zero .\n", 1: b"held one .\n", 2: b"held two .\n"}
    fn = "1-billion-word-language-modeling-benchmark-r13output.tar.gz"
    server.files[fn] = t = _lm1b_tar(shards, heldout)
    assert _run(server, tmp_path, "lm1b", "--md5", _md5(t)) == 0
    train, valid, test = _read(tmp_path, "lm1b")
    assert (train, valid, test) == (shards[1] + shards[2], heldout[1], heldout[0])
    assert _run(server, tmp_path, "lm1b", "--md5", _md5(t), "--lm1b-valid-shard", "2", "--name", "lm1b_v2") == 0
    assert _read(tmp_path, "lm1b_v2")[1:] == [heldout[2], heldout[0]]


def test_lm1b_same_shard_refused_before_download(server, tmp_path, capsys):
    assert _run(server, tmp_path, "lm1b", "--lm1b-valid-shard", "0", "--lm1b-test-shard", "0") == 2
    assert "different held-out shards" in capsys.readouterr().err
    assert server.requests == []


def test_local_file_split_at_line_ends(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_bytes(b"aa\nbb\ncc\ndd\n")  # 12 bytes; cuts after bytes 6 and 9 -> "aa\nbb\n" | "cc\n" | "dd\n"
    assert get_data.main(["local", "--path", str(src), "--split", "0.5,0.25,0.25", "--data-dir",
                          str(tmp_path / "data")]) == 0
    assert _read(tmp_path, "local") == [b"aa\nbb\n", b"cc\n", b"dd\n"]


def test_local_folder_sorted_and_newline_joined(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_bytes(b"line b1\nline b2")  # no final newline: one is added
    (d / "a.txt").write_bytes(b"line a1\n")
    (d / "sub" / "c.txt").write_bytes(b"line c1\nline c2\n")
    # stream = a.txt + b.txt + "\n" + sub/c.txt = 40 bytes; cuts at 20 and 30 -> end of lines holding bytes 19, 29
    assert get_data.main(["local", "--path", str(d), "--split", "0.5,0.25,0.25", "--data-dir",
                          str(tmp_path / "data"), "--name", "mine"]) == 0
    assert _read(tmp_path, "mine") == [b"line a1\nline b1\nline b2\n", b"line c1\n", b"line c2\n"]


def test_resume_after_a_dropped_connection(server, tmp_path, capsys):
    server.files["enwik8.zip"] = z = _zip({"enwik8": ENWIK}, zipfile.ZIP_STORED)
    server.break_after["enwik8.zip"] = 500
    args = ("enwik8", "--split-bytes", "1000,100,100", "--md5", _md5(z))
    assert _run(server, tmp_path, *args) == 2
    assert "re-run to resume" in capsys.readouterr().err
    part = tmp_path / "data" / "downloads" / "enwik8.zip.part"
    assert part.read_bytes() == z[:500]
    assert _run(server, tmp_path, *args) == 0
    assert server.requests == [("enwik8.zip", None), ("enwik8.zip", "bytes=500-")]
    assert (tmp_path / "data" / "downloads" / "enwik8.zip").read_bytes() == z
    assert not part.exists()
    assert _read(tmp_path, "enwik8")[0] == ENWIK[:1000]


def test_resume_when_server_ignores_range(server, tmp_path):
    server.files["text8.zip"] = z = _zip({"text8": TEXT8})
    part = tmp_path / "data" / "downloads" / "text8.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that a 200 reply must overwrite")
    server.ignore_range = True
    assert _run(server, tmp_path, "text8", "--split-bytes", "900,50,50", "--md5", _md5(z)) == 0
    assert server.requests[0][1] is not None  # it did ask for a range
    assert (tmp_path / "data" / "downloads" / "text8.zip").read_bytes() == z


def test_verified_archive_is_not_downloaded_again(server, tmp_path):
    server.files["text8.zip"] = z = _zip({"text8": TEXT8})
    args = ("text8", "--split-bytes", "900,50,50", "--md5", _md5(z))
    assert _run(server, tmp_path, *args) == 0 and _run(server, tmp_path, *args) == 0
    assert len(server.requests) == 1


def test_checksum_mismatch_removes_the_file(server, tmp_path, capsys):
    server.files["text8.zip"] = _zip({"text8": TEXT8})
    assert _run(server, tmp_path, "text8", "--md5", "0" * 32) == 2
    err = capsys.readouterr().err.strip()
    assert "checksum mismatch" in err and "text8.zip" in err and "\n" not in err
    assert os.listdir(tmp_path / "data" / "downloads") == []


def test_builtin_catalog_size_is_checked(server, tmp_path, capsys):
    server.files["enwik8.zip"] = _zip({"enwik8": ENWIK})  # not the real 36,445,475-byte archive
    assert _run(server, tmp_path, "enwik8") == 2
    assert "expected 36445475" in capsys.readouterr().err


def test_truncated_zip(server, tmp_path, capsys):
    z = _zip({"enwik8": ENWIK})
    server.files["enwik8.zip"] = bad = z[: len(z) // 2]
    assert _run(server, tmp_path, "enwik8", "--split-bytes", "900,150,100", "--md5", _md5(bad)) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_corrupted_zip_content(server, tmp_path, capsys):
    z = bytearray(_zip({"text8": TEXT8 * 5}, zipfile.ZIP_STORED))
    z[len(z) // 3] ^= 0xFF  # inside the stored member: the CRC-32 check must catch it
    server.files["text8.zip"] = bytes(z)
    assert _run(server, tmp_path, "text8", "--split-bytes", "900,50,50", "--md5", _md5(bytes(z))) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_truncated_tar(server, tmp_path, capsys):
    full = _lm1b_tar({1: b"x y z .\n" * 2000}, {0: b"a .\n", 1: b"b .\n"})
    fn = "1-billion-word-language-modeling-benchmark-r13output.tar.gz"
    server.files[fn] = t = full[: len(full) // 2]
    assert _run(server, tmp_path, "lm1b", "--md5", _md5(t)) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_unreachable_host(tmp_path, capsys):
    s = _Server()
    url = s.base_url
    s.close()  # nothing listens there any more
    assert get_data.main(["text8", "--data-dir", str(tmp_path), "--base-url", url, "--no-progress"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_missing_on_server(server, tmp_path, capsys):
    assert _run(server, tmp_path, "text8") == 2
    assert "HTTP 404" in capsys.readouterr().err


@pytest.mark.parametrize("content,needle", [(None, "does not exist"), (b"", "is empty"),
                                            (b"\x00\x01binary\x00", "not text")])
def test_local_bad_inputs(tmp_path, capsys, content, needle):
    p = tmp_path / "c.txt"
    if content is not None:
        p.write_bytes(content)
    assert get_data.main(["local", "--path", str(p), "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(p) in err


def test_local_too_small_and_bad_ratios(tmp_path, capsys):
    p = tmp_path / "one_line.txt"
    p.write_bytes(b"a single line\n")
    assert get_data.main(["local", "--path", str(p), "--data-dir", str(tmp_path / "d")]) == 2
    assert "would be empty" in capsys.readouterr().err
    assert get_data.main(["local", "--path", str(p), "--split", "0.8,0.1,0.2", "--data-dir", str(tmp_path)]) == 2
    assert "not 1" in capsys.readouterr().err


def test_shell_wrapper(tmp_path):
    src = tmp_path / "c.txt"
    src.write_bytes(b"".join(b"line %d\n" % i for i in range(100)))
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "get_data.sh"), "local", "--path", str(src),
                        "--data-dir", str(tmp_path / "d")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert r.returncode == 0, r.stderr
    joined = b"".join((tmp_path / "d" / "local" / f"{s}.txt").read_bytes() for s in ("train", "valid", "test"))
    assert joined == src.read_bytes()
