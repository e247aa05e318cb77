"""The imported checkpoint loaded the way pretrain_vqmoe.py --load loads it, at its ep size on 2 ranks: logits of
the reference input against transformers' (computed by the test)."""
import sys

from common import finish, init

import torch  # noqa: E402


def main(save_dir, ref_path, out_path):
    rank, world = init()
    import deepspeed

    from vqmoe_ds import checkpoint as ckpt
    from vqmoe_ds.models import ModelConfig, build_model

    marker = ckpt.verify(save_dir, ckpt.resolve(save_dir)[1])
    cfg = ModelConfig.from_dict(marker["model_config"])
    torch.manual_seed(0)
    model = build_model(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ckpt.minimal_ds_config())
    ckpt.load(engine, save_dir, resume=True, model=model, model_config=cfg.to_dict())
    model.eval()
    ref = torch.load(ref_path)
    with torch.no_grad():
        logits = model(ref["x"])[0]
    res = {"ep_size": cfg.moe.ep_size, "max_diff": (logits - ref["logits"]).abs().max().item()}
    print(f"rank {rank}: {res}")
    torch.save(res, f"{out_path}.{rank}")
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
