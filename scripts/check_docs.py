#!/usr/bin/env python
"""Check every command README.md and docs/*.md show against the code: the scripts they run exist and accept every
flag given to them, the make targets exist.

    python scripts/check_docs.py [FILE.md ...]      # default: README.md and docs/*.md; exit 1 on any problem

Commands are read from fenced code blocks (bash, sh or none), 4-space indented blocks and inline code spans;
continued lines (``\\``) are joined, and ``&&``, ``;``, ``|`` and ``for ... do`` split them into simple commands.
A command runs a repository script when one of its words is a ``.py`` (or ``.sh``) path of the repository:
``python tools/x.py``, ``torchrun ... pretrain_vqmoe.py``, ``deepspeed --num_gpus 8 finetune_vqmoe.py``,
``mpirun ... python train_vision.py``, or a bare ``tools/x.py`` in prose.  The flags after that word (``--x`` and
``--x=v``; a subcommand of ``tools/get_data.py`` first) are checked against the option strings of the script's own
``--help`` (each script's help is read once).  What is not checked: the values,
and whether the command succeeds on real data, a GPU cluster or a download (tests run those they can).
"""
import glob
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))
FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*")
SUBCOMMANDS = {"tools/get_data.py", "tools/get_vision_data.py", "setup.py"}  # first word a subcommand


def commands(text: str):
    """(line number, command text) of every command-like snippet of a markdown text."""
    lines = text.splitlines()
    out, i, fence = [], 0, None
    block = []
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^\s*```(\w*)", line)
        if m:
            if fence is None:
                fence = m.group(1) or "sh"
                block = []
            else:
                if fence in ("bash", "sh"):
                    out += block
                fence = None
            i += 1
            continue
        if fence is not None:
            block.append((i + 1, line))
        elif line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip() or
                                                              lines[i - 1].startswith("    ")):
            out.append((i + 1, line))
        else:
            for span in re.findall(r"`([^`]+)`", line):
                if re.search(r"(^|\s|/)[\w./-]+\.(py|sh)\b", span) and "--" in span or re.match(r"make \w", span):
                    out.append((i + 1, span))
        i += 1
    joined, cont = [], None
    for n, line in out:
        text = line.strip()
        if cont is not None:
            cont = (cont[0], cont[1] + " " + text.rstrip("\\").strip())
        else:
            cont = (n, text.rstrip("\\").strip())
        if not text.endswith("\\"):
            joined.append(cont)
            cont = None
    if cont is not None:
        joined.append(cont)
    return joined


def simple_commands(text: str):
    text = text.split(" #", 1)[0] if not text.startswith("#") else ""
    text = re.sub(r"\bfor \w+ in .*?; do\b", ";", text)
    for part in re.split(r"&&|\|\||;|\|", text):
        part = part.strip()
        if part and part not in ("done", "do", "then", "fi"):
            yield part


def words(cmd: str):
    try:
        return shlex.split(cmd)
    except ValueError:
        return cmd.split()


def repo_script(word: str):
    """The repository path of ``word`` when it names a script of the repository."""
    if not word.endswith((".py", ".sh")) or "$" in word or "*" in word:
        return None
    rel = os.path.normpath(word)
    return rel if os.path.isfile(os.path.join(ROOT, rel)) or rel.startswith(("tools/", "scripts/", "bench/",
                                                                                "examples/")) else None


_HELP = {}


def help_flags(script: str, sub=None):
    """(option strings of ``python script [sub] --help``, why it failed or None); each script run once, as a user
    runs it (in a process of its own: some scripts re-execute themselves)."""
    key = (script, sub)
    if key not in _HELP:
        cmd = [sys.executable, os.path.join(ROOT, script)] + ([sub] if sub else []) + ["--help"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
            failed = None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
            _HELP[key] = (set(FLAG.findall(r.stdout)), failed)
        except subprocess.TimeoutExpired:
            _HELP[key] = (set(), "timed out")
    return _HELP[key]


def make_targets() -> set:
    with open(os.path.join(ROOT, "Makefile")) as f:
        return {m.group(1) for m in re.finditer(r"^([\w-]+):", f.read(), re.M)}


def script_commands(path: str):
    """(line, simple command, its words) of every command of a markdown file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for n, cmd in commands(text):
        for simple in simple_commands(cmd):
            yield n, simple, words(simple)


# scripts that pass the words after a bare `--` to another script, and that script
PASS_THROUGH = {"tools/sweep.py": "pretrain_vqmoe.py"}


def script_and_sub(w):
    idx = next((k for k, word in enumerate(w) if repo_script(word)), None)
    if idx is None:
        return None, None, []
    script, rest = repo_script(w[idx]), w[idx + 1:]
    sub = rest[0] if script in SUBCOMMANDS and rest and not rest[0].startswith("-") else None
    return script, sub, rest


def prefetch(paths) -> None:
    """Read the help of every script the files run, a few at a time (each is a process of its own)."""
    from concurrent.futures import ThreadPoolExecutor

    keys = set()
    for path in paths:
        for _, _, w in script_commands(path):
            script, sub, _ = script_and_sub(w)
            if script and script.endswith(".py") and os.path.isfile(os.path.join(ROOT, script)):
                keys.add((script, sub))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        list(pool.map(lambda k: help_flags(*k), sorted(keys, key=str)))


def help_problem(name: str, failed) -> str:
    """The problem of a script whose --help could not be read (``failed``: why, or None when it printed no flags)."""
    return f"{name} --help {'failed: ' + failed if failed else 'printed no flags'}"


def check(path: str):
    """Problems of one markdown file: (line, message)."""
    rel = os.path.relpath(path, ROOT)
    problems, targets = [], make_targets()
    for n, simple, w in script_commands(path):
        if len(w) >= 2 and w[0] == "make":
            for t in w[1:]:
                if not t.startswith("-") and "=" not in t and t not in targets:
                    problems.append((n, f"make target {t!r} does not exist (Makefile has {sorted(targets)})"))
            continue
        script, sub, rest = script_and_sub(w)
        if script is None:
            continue
        if not os.path.isfile(os.path.join(ROOT, script)):
            problems.append((n, f"{script} does not exist: `{simple}`"))
            continue
        if not script.endswith(".py"):
            continue
        name, (known, failed) = f"{script}{' ' + sub if sub else ''}", help_flags(script, sub)
        if failed or not known:
            problems.append((n, help_problem(name, failed)))
            continue
        # a sweep hands the words after a bare `--` to every run: they are pretrain_vqmoe.py's flags
        groups = [(name, known, rest)]
        if script in PASS_THROUGH and "--" in rest:
            cut, driver = rest.index("--"), PASS_THROUGH[script]
            driver_known, driver_failed = help_flags(driver, None)
            groups[0] = (name, known, rest[:cut])
            if driver_failed or not driver_known:
                problems.append((n, help_problem(driver, driver_failed)))
            else:
                groups.append((driver, driver_known, rest[cut + 1:]))
        for who, flags, words in groups:
            for word in words:
                flag = word.split("=", 1)[0]
                if FLAG.fullmatch(flag) and flag not in flags and flag != "--help":
                    problems.append((n, f"{who} has no flag {flag}: `{simple}`"))
    return [(f"{rel}:{n}", msg) for n, msg in problems]


def main(argv=None):
    files = (argv if argv else None) or [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs",
                                                                                                       "*.md")))
    problems, checked = [], 0
    prefetch(files)
    for path in files:
        problems += check(path)
        checked += 1
    for where, msg in problems:
        print(f"{where}: {msg}")
    scripts = sorted({s for s, _ in _HELP})
    print(f"checked {checked} file(s), {len(scripts)} script(s)' flags: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
