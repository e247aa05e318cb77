"""Every command README.md and docs/*.md show runs a script that exists with flags that script accepts
(scripts/check_docs.py, which reads each script's own --help), and the checker catches what it should."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checker():
    spec = importlib.util.spec_from_file_location("check_docs", os.path.join(ROOT, "scripts", "check_docs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_checker_finds_wrong_flags_missing_scripts_and_targets(tmp_path):
    md = tmp_path / "doc.md"
    md.write_text("\n".join([
        "Prose with `tools/get_data.py local --input ../shared/data/warpeace.txt`, 90/5/5.",
        "",
        "```bash",
        "python tools/get_data.py local --path corpus.txt --split 0.9,0.05,0.05 && make demo",
        "torchrun --nproc_per_node=2 pretrain_vqmoe.py --config tiny --router vqmoe \\",
        "    --moe-expert-parallel-size 2 --no-such-flag 3   # a comment --also-not-checked",
        "python tools/no_such_tool.py --x 1",
        "make no-such-target",
        "```",
        "",
        "    python tools/estimate_memory.py --config base --gpu-memory-gib 80 --json",
        "",
        "    python tools/sweep.py --preset seeds --no-such-sweep-flag -- --lr 0.001 --no-such-run-flag 1",
        ""]))
    problems = _checker().check(str(md))
    got = sorted((where.rsplit(":", 1)[1], msg.split(":")[0]) for where, msg in problems)
    assert got == [("1", "tools/get_data.py local has no flag --input"),
                   ("13", "pretrain_vqmoe.py has no flag --no-such-run-flag"),
                   ("13", "tools/sweep.py has no flag --no-such-sweep-flag"),
                   ("5", "pretrain_vqmoe.py has no flag --no-such-flag"),
                   ("7", "tools/no_such_tool.py does not exist"),
                   ("8", "make target 'no-such-target' does not exist (Makefile has ['bench', 'demo', 'gpu-check', "
                         "'setup', 'test'])")], problems


def test_every_command_of_readme_and_docs():
    checker = _checker()
    files = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(ROOT, "docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
    checker.prefetch(files)
    problems = [p for f in files for p in checker.check(f)]
    assert not problems, "\n".join(f"{w}: {m}" for w, m in problems)
