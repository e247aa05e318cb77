"""Sentence embeddings: Spearman with ties, the two classifiers, and tools/embed.py against embeddings computed
from an independent reading of the checkpoint."""
import json
import os

import torch

from test_finetune_support import pretrained, reference_model, source_task, tmpdir, tool
from vqmoe_ds.data.tokenizers import ByteTokenizer
from vqmoe_ds.finetune.embedding import (embed_texts, logistic_regression, nearest_centroid, rankdata, spearman,
                                         sts_spearman)


def test_rankdata_and_spearman_hand_cases():
    assert rankdata(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert abs(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 50.0, 60.0])) - 1.0) < 1e-12
    assert abs(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) + 1.0) < 1e-12
    # ranks a = [1, 2, 3, 4], b = [2, 1, 4, 3]: rho = 1 - 6 * 4 / (4 * 15) = 0.6
    assert abs(spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([2.0, 1, 4, 3])) - 0.6) < 1e-12


def test_classifiers_on_separable_embeddings():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    y = torch.arange(3).repeat(40)
    x = means[y] + 0.5 * torch.randn(120, 3, generator=g)
    assert (nearest_centroid(x[:90], y[:90], x[90:], 3) == y[90:]).all()
    assert (logistic_regression(x[:90], y[:90], x[90:], 3) == y[90:]).all()


def test_tool_matches_independent_embeddings():
    pre, out = pretrained("vqmoe"), tmpdir("emb")
    sts = os.path.join(out, "sts.tsv")
    pairs = [("the cat watches a river .", "the cat watches the river .", 5.0),
             ("12 + 4 = 16", "the old king opens a lamp", 0.0),
             ("def scale_3(x, y):", "def shift_2(n, z):", 4.0),
             ("ACGTTAGACC", "colour: amber", 0.5), ("city: oslo", "city: riga", 4.5)]
    with open(sts, "w") as f:
        f.write("s1\ts2\tscore\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in pairs))
    task = source_task()
    tool("embed.py", "--load", pre, "--sts", sts, "--train", task["train"], "--test", task["test"],
         "--out", os.path.join(out, "emb.json"))
    res = json.load(open(os.path.join(out, "emb.json")))
    model = reference_model(os.path.join(pre, "checkpoints", "step20"))
    e1 = embed_texts(model, ByteTokenizer(), [a for a, _, _ in pairs], 64)
    e2 = embed_texts(model, ByteTokenizer(), [b for _, b, _ in pairs], 64)
    assert abs(res["sts"]["spearman"] - sts_spearman(e1, e2, torch.tensor([c for _, _, c in pairs]))) < 1e-9
    c = res["classification"]
    assert c["test"] == 200 and c["logistic_regression"] > 0.5 and c["nearest_centroid"] > 0.3  # chance ~0.2
