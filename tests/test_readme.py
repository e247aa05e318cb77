"""The README's python snippets run as written."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_snippets_run():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python snippet"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_config_file_is_read_as_shown(tmp_path):
    """The YAML config file the README writes is accepted by the pretraining driver, and its flag overrides it."""
    from vqmoe_ds.training.lm import command_line, make_task

    text = open(os.path.join(ROOT, "README.md")).read()
    yaml_text = re.search(r"cat > my\.yaml <<'YAML'\n(.*?)\nYAML\n", text, flags=re.S).group(1)
    path = tmp_path / "my.yaml"
    path.write_text(yaml_text)
    task = make_task(command_line().parse(["--config-file", str(path), "--top-k", "1"]))
    cfg = task.model_config
    assert (cfg.d_model, cfg.moe.router, cfg.moe.num_experts, cfg.moe.vq_alpha) == (256, "vqmoe", 16, 0.1)
    assert cfg.moe.top_k == 1
    assert (task.optim.lr, task.optim.lr_warmup_iters, task.optim.train_iters) == (3.5e-4, 2000, 100000)
