"""A stand-in for pretrain_vqmoe.py in the sweep's bookkeeping tests: ``fake_driver.py --config-file RUN.yaml
[--load CHECKPOINTS]`` trains nothing and writes, into the run's --out-dir, the files the sweep reads back, with
numbers fixed by the run's router and seed (``BASE``):

  * log.jsonl: a train record per step (tokens_per_s = 1000 + 10 x step) and a validation record every
    --eval-interval steps and at the end, BPC = BASE + 0.1 x (steps - step) / steps (the best is the last, BASE);
  * checkpoints/stepN and checkpoints/latest every --save-interval steps;
  * config.json (model and MoE sections from the driver's own parser), ds_config.json (micro-batch, one rank),
    run_info.json (params 1000 total, 600 active), and at the end results.json: best validation BPC BASE, test BPC
    BASE + 0.05, loss = BPC x ln 2.

``FAKE_FAIL=run:step,...`` makes that run exit 1 after step ``step`` (no results).  Every start
appends its argv to ``OUT_DIR/argv.jsonl``."""
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from vqmoe_ds.training.lm import command_line, model_config  # noqa: E402

BASE = {("topk", 1): 2.10, ("topk", 2): 2.14, ("vqmoe", 1): 2.09, ("vqmoe", 2): 2.11}


def main(argv):
    parsed = command_line().parse(argv)
    run, optim = parsed.given("run"), parsed.given("optim")
    out, steps = run["out_dir"], optim["train_iters"]
    name = os.path.basename(out)
    cfg = model_config(parsed)
    base = BASE[(cfg.moe.router, optim["seed"])]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "argv.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\n")
    ck = os.path.join(out, "checkpoints")
    start = 0
    if "--load" in argv:
        with open(os.path.join(argv[argv.index("--load") + 1], "latest")) as f:
            start = int(f.read().strip()[len("step"):])
    model = cfg.to_dict()
    moe = model.pop("moe")
    micro = optim.get("micro_batch_size", 8)
    files = {"config.json": {"model": model, "moe": moe},
             "ds_config.json": {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                                "train_batch_size": micro},
             "run_info.json": {"world_size": 1, "params": {"total": 1000, "active": 600}}}
    for file, content in files.items():
        with open(os.path.join(out, file), "w") as f:
            json.dump(content, f)
    fail = os.environ.get("FAKE_FAIL", "")
    with open(os.path.join(out, "log.jsonl"), "a") as log:
        for step in range(start + 1, steps + 1):
            log.write(json.dumps({"kind": "train", "step": step, "loss": 5.0, "tokens_per_s": 1000.0 + 10 * step}) + "\n")
            if step % run.get("eval_interval", steps) == 0 or step == steps:
                bpc = base + 0.1 * (steps - step) / steps
                log.write(json.dumps({"kind": "valid", "step": step, "loss": bpc * math.log(2), "bpc": bpc}) + "\n")
            if run.get("save_interval") and step % run["save_interval"] == 0:
                os.makedirs(os.path.join(ck, f"step{step}"), exist_ok=True)
                with open(os.path.join(ck, "latest"), "w") as f:
                    f.write(f"step{step}")
            log.flush()
            if f"{name}:{step}" in fail.split(","):
                return 1
    test_bpc = base + 0.05
    results = {"best_valid": {"loss": base * math.log(2), "bpc": base, "step": steps},
               "test": {"loss": test_bpc * math.log(2), "bpc": test_bpc, "ppl": math.exp(test_bpc * math.log(2))},
               "steps": steps}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
