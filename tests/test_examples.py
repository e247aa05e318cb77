"""examples/{base,large}/<dataset>.yaml: each is a config file the driver reads, and with --router gives every row
of the paper's Table 1 at the settings of the authors' scripts (Transformer-XL, 16 experts, top-2, codebook 16,
lr 3.5e-4 cosine to 0, 100k steps, segments of 512 with 512 of memory, evaluation segments of 128, dropout 0.1
and none on attention, the dataset's global batch)."""
import glob
import os

import pytest

from vqmoe_ds.training.lm import command_line, make_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "examples", "*", "*.yaml")))
BATCH = {"enwik8": 44, "text8": 44, "wikitext103": 22, "lm1b": 11}
SHAPE = {"base": (4, 256), "large": (12, 512)}


def test_every_size_and_dataset_has_a_file():
    assert sorted(os.path.relpath(f, os.path.join(ROOT, "examples")) for f in FILES) == \
        sorted(f"{s}/{d}.yaml" for s in SHAPE for d in BATCH)


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, ROOT))
@pytest.mark.parametrize("router", ["dense", "topk", "xmoe", "stablemoe", "smoe_dropout", "vqmoe"])
def test_a_row_of_table1(path, router):
    size, data = path.split(os.sep)[-2], os.path.basename(path)[:-5]
    task = make_task(command_line().parse(["--config-file", path, "--router", router]))
    cfg = task.model_config
    assert (cfg.model, cfg.n_layer, cfg.d_model, cfg.seq_len, cfg.mem_len) == ("txl", *SHAPE[size], 512, 512)
    assert (cfg.dropout, cfg.attn_dropout) == (0.1, 0.0)
    m = cfg.moe_config(0)
    assert m.router == router
    if router != "dense":
        assert (m.num_experts, m.top_k, m.codebook_size, m.vq_alpha) == (16, 2, 16, 0.08)
    assert (task.optim.lr, task.optim.min_lr, task.optim.train_iters) == (3.5e-4, 0.0, 100000)
    assert task.optim.micro_batch_size == BATCH[data] and task.data.eval_seq_length == 128
    assert task.data.data_path.startswith("data/")
