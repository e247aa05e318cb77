"""One set of defaults: a named shape's MoE values (tiny: 4 experts, codebook 8) are what the model gets unless a
flag overrides them, and the start-up banner prints the effective shape, not the preset's name."""
import torch

from vqmoe_ds.models import build_model, named_config
from vqmoe_ds.moe.config import MoEConfig
from vqmoe_ds.training.lm import LanguageModelling, command_line, describe_shape, model_config


def test_preset_values_and_flags_reach_the_model_config():
    tiny = model_config(command_line().parse(["--config", "tiny"]))
    assert (tiny.n_layer, tiny.d_model, tiny.n_head, tiny.d_inner, tiny.seq_len) == (2, 64, 4, 128, 64)
    assert tiny.moe.num_experts == 4 and tiny.moe.codebook_size == 8 and tiny.moe.router == "vqmoe"
    assert MoEConfig(hidden_size=8, ffn_hidden_size=8).codebook_size == 16  # the class default differs: documented
    demo = model_config(command_line().parse(["--config", "tiny", "--num-layers", "4", "--hidden-size", "128",
                                              "--codebook-size", "16", "--num-experts", "8"]))
    assert demo.n_layer == 4 and demo.d_model == 128 and demo.moe.codebook_size == 16


def test_banner_prints_the_effective_shape(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"abc def\n" * 2000)
    parsed = command_line().parse(["--config", "tiny", "--num-layers", "3", "--hidden-size", "32",
                                   "--num-attention-heads", "2", "--ffn-hidden-size", "48", "--seq-length", "16",
                                   "--num-experts", "6", "--top-k", "1", "--codebook-size", "12",
                                   "--data-file", str(path)])
    task = LanguageModelling.from_parsed(parsed)
    task.load()
    torch.manual_seed(0)
    task.model = build_model(task.model_config)
    banner = task.describe()
    assert banner.startswith("model gpt: 3 layers, d 32, 2 heads, FFN 48, vocab 256, context 16, vqmoe MoE: "
                             "6 experts of FFN 48, top-1, ep 1, codebook 12; parameters: total")
    assert "tiny" not in banner and "no test split" not in banner


def test_shape_of_other_models():
    assert describe_shape(named_config("tiny", moe={"router": "dense"})).endswith("context 64, dense")
    txl = describe_shape(named_config("tiny", model="txl", mem_len=32, moe={"router": "topk", "num_experts": 4},
                                      moe_layers="1"))
    assert txl == ("model txl: 2 layers, d 64, 4 heads, FFN 128, vocab 256, segment 64, memory 32, topk MoE in "
                   "layers 1: 4 experts of FFN 128, top-2, ep 1")
