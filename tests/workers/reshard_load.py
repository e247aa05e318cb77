"""Load a (resharded) checkpoint through the driver's path (``checkpoint.load``, resume) at the ep size of this
launch and report, per rank, the global id of every local expert with the mean of its fc1 bias."""
import json
import sys

from common import finish, init

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.moe.layer import MoE  # noqa: E402
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: E402
from deepspeed.utils import groups as ds_groups  # noqa: E402

from vqmoe_ds.models import ModelConfig, build_model  # noqa: E402
from vqmoe_ds import checkpoint as ckpt  # noqa: E402


def main(load_dir, ep, out_path):
    rank, world = init()
    marker = ckpt.verify(load_dir, ckpt.resolve(load_dir)[1])
    cfg = ModelConfig.from_dict({**marker["model_config"], "moe": {**marker["model_config"]["moe"], "ep_size": ep}})
    torch.manual_seed(0)
    model = build_model(cfg)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"})
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    client, _ = ckpt.load(engine, load_dir, resume=True, model=model, model_config=cfg.to_dict())
    experts = {}
    layer = 0
    for module in model.modules():
        if isinstance(module, MoE):
            n_local = module.num_local_experts
            ep_rank = ds_groups._get_expert_parallel_rank(module.expert_group_name)
            for local, expert in enumerate(module.deepspeed_moe.experts.deepspeed_experts):
                experts[f"{layer}:{ep_rank * n_local + local}"] = expert.fc1.bias.mean().item()
            layer += 1
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump({"experts": experts, "step": client["step"], "data": client["data"]}, f)
    finish()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
