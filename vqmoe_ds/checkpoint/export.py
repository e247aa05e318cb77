"""Export: a checkpoint as files other programs read (``tools/export_checkpoint.py`` is the command line).

* ``--format safetensors`` (`export_safetensors`): all weights and buffers (every expert of every MoE layer
  gathered, expert parallelism 1) in ``FILE.safetensors``, the model config in ``FILE.json`` and the SHA-256 of
  both in ``FILE.sha256.json`` (`manifest`).  ``read.load_exported`` verifies the manifest and rebuilds the
  model; any reader of safetensors (numpy, JAX, Rust) can read the tensors, named as the PyTorch modules name
  them.
* ``--format hf`` (`export_hf`): a Hugging Face folder as ``save_pretrained`` writes it, in the key map and
  config mapping of `hf` (which reads such folders back): ``OlmoeForCausalLM`` for a top-k model of OLMoE's
  block, the ``trust_remote_code`` package (``hf_remote/``) for a VQMoE one, in the per-expert layout every
  transformers version reads, with its SHA-256 manifest.

`pick_tag` is the tag rule of the tools that read a run's checkpoints: ``best`` unless a tag is given, else
``latest`` with a notice.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..models import ModelConfig
from .hf import TOKENIZER_FILES, VQ_HF_FIELDS, expert_prefix, has_router, vq_keys
from .layout import BEST, CheckpointError
from .manifest import file_manifest_path, write_manifest

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
REMOTE_FILES = ("configuration_vqmoe.py", "modeling_vqmoe.py")  # the trust_remote_code package of a VQMoE export
SHARD_BYTES = 5 * 2 ** 30  # the export's largest shard (transformers' default)


def pick_tag(load: str, tag: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """(tag, notice): ``tag`` when given; otherwise ``best`` when the run has one, else None (``latest``) and a
    notice saying so (a run without a validation split saves no ``best``)."""
    from .layout import resolve

    if tag is not None:
        return tag, None
    try:
        resolve(load, BEST)
        return BEST, None
    except CheckpointError:
        save_dir, latest = resolve(load, None)
        return None, (f"notice: {save_dir} has no '{BEST}' checkpoint (a run saves one when it validates): using "
                      f"the latest, {latest}")


def export_safetensors(load_dir: str, tag: Optional[str], out: str, overwrite: bool = False) -> Dict[str, int]:
    """Write ``out`` (``.safetensors``), its ``.json`` and its ``.sha256.json`` beside it; returns {"tensors",
    "parameters"}.  Existing files are replaced only with ``overwrite``."""
    from safetensors.torch import save_file

    from .read import load_for_inference, read_run

    if not out.endswith(".safetensors"):
        raise CheckpointError(f"--out {out} must end in .safetensors: name the file like model.safetensors")
    meta_path, sums = os.path.splitext(out)[0] + ".json", file_manifest_path(out)
    existing = [p for p in (out, meta_path, sums) if os.path.exists(p)]
    if existing and not overwrite:
        raise CheckpointError(f"{existing[0]} exists: give another --out, or --overwrite to replace it")
    model, cfg, tag = load_for_inference(load_dir, tag)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    seen = {}
    for k, v in list(state.items()):  # tied weights: safetensors refuses shared storage, store copies
        key = (v.data_ptr(), v.shape, v.stride())
        if v.numel() and key in seen:
            state[k] = v.clone()
        seen[key] = k
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = out + ".tmp"
    save_file(state, tmp, metadata={"format": "pt", "source": os.path.join(load_dir, tag)})
    os.replace(tmp, out)
    tokenizer = read_run(load_dir, tag).client_state.get("tokenizer")
    meta = {"model_config": cfg.to_dict(), "source": os.path.abspath(os.path.join(load_dir, tag)),
            "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values())),
            "tokenizer": {k: v for k, v in (tokenizer or {}).items() if k != "vocab_file"} or None}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    write_manifest(sums, folder, [os.path.basename(out), os.path.basename(meta_path)])
    return {"tensors": meta["tensors"], "parameters": meta["parameters"]}


# ---- Hugging Face ------------------------------------------------------------------------------------------
def exportable(cfg: ModelConfig) -> str:
    """What the model exports as: ``"olmoe"`` (a top-k model of OLMoE's block: ``OlmoeForCausalLM``) or ``"vqmoe"``
    (a VQMoE model of OLMoE's block: the ``trust_remote_code`` package).  Anything else is refused in one line
    naming the setting."""
    m = cfg.moe_config(0) if cfg.is_moe else None
    if m is None:
        raise CheckpointError("this model is dense; OlmoeForCausalLM needs MoE layers: use --format safetensors")
    wanted = [("model", cfg.model, "gpt"), ("normalization", cfg.normalization, "RMSNorm"), ("swiglu", cfg.swiglu, True),
              ("position_embedding_type", cfg.position_embedding_type, "rope"), ("qk_norm", cfg.qk_norm, "hidden"),
              ("add_bias_linear", cfg.add_bias_linear, False),
              ("moe_layers", len(cfg.moe_layer_ids()), cfg.n_layer)]
    block = "OlmoeForCausalLM" if m.router != "vqmoe" else "the VQMoE export (OLMoE's decoder)"
    if m.router == "vqmoe":
        wanted += [("moe.vq_kind", m.vq_kind, "codebook"), ("moe.shared_expert_size", m.shared_expert_size, 0),
                   ("moe.force_load_balancing", m.force_load_balancing, False)]
    else:
        wanted += [("moe.router", m.router, "topk"), ("moe.score_function", m.score_function, "softmax"),
                   ("moe.topk_scaling_factor", m.topk_scaling_factor, 1.0), ("moe.expert_bias", m.expert_bias, False),
                   ("moe.shared_expert_size", m.shared_expert_size, 0),
                   ("moe.force_load_balancing", m.force_load_balancing, False)]
    for name, have, want in wanted:
        if have != want:
            what = "MoE layers" if name == "moe_layers" else f"{name}={have!r}"
            raise CheckpointError(f"this model has {what}; {block} needs {name}={want!r}: only top-k and VQMoE "
                                  f"models of OLMoE's block (e.g. imported with tools/convert_hf.py and converted with "
                                  f"tools/convert_to_vqmoe.py, or --config olmoe-1b-7b) export to --format hf; use "
                                  f"--format safetensors")
    return "vqmoe" if m.router == "vqmoe" else "olmoe"


def _moe_record(cfg: ModelConfig) -> Dict[str, Any]:
    """The model's MoE settings as the ``vqmoe_ds`` record of config.json (every field, defaults spelled out)."""
    m = cfg.moe_config(cfg.moe_layer_ids()[0])
    return {k: v for k, v in m.all_settings().items() if k != "ep_size"}


def _hf_norm_topk_prob(m) -> bool:
    """OLMoE's ``norm_topk_prob`` for our router: it renormalises the chosen probabilities at every k, so a single
    route gets weight 1 under it (our ``top1_weight="one"``) and its own probability without it."""
    return m.norm_topk_prob if m.top_k > 1 else m.top1_weight == "one"


def hf_config_for(cfg: ModelConfig, original: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """config.json for ``cfg``: ``OlmoeForCausalLM``'s, or for a VQMoE model the same plus its VQ settings, the
    ``auto_map`` of the remote code and model_type ``vqmoe_olmoe`` (token ids and other fields of an imported
    model's original config are kept)."""
    m = cfg.moe_config(0)
    out = {k: v for k, v in (original or {}).items() if k not in ("rope_scaling", "auto_map", "vqmoe_ds")}
    out.update({
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head, "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len, "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rotary_base,
        "rope_parameters": {"rope_theta": cfg.rotary_base, "rope_type": "default"}, "attention_bias": False,
        "attention_dropout": cfg.attn_dropout, "clip_qkv": None, "num_experts_per_tok": m.top_k,
        "num_experts": m.num_experts, "router_aux_loss_coef": m.balance_loss_coef, "norm_topk_prob": _hf_norm_topk_prob(m),
        "output_router_logits": False, "dtype": "float32", "torch_dtype": "float32", "vqmoe_ds": {"moe": _moe_record(cfg)}})
    if m.router == "vqmoe":
        theirs = {ours: hf for hf, ours in VQ_HF_FIELDS.items()}
        out.update({theirs[k]: getattr(m, k) for k in theirs})
        out.update({"architectures": ["VQMoEOlmoeForCausalLM"], "model_type": "vqmoe_olmoe",
                    "auto_map": {"AutoConfig": "configuration_vqmoe.VQMoEOlmoeConfig",
                                 "AutoModelForCausalLM": "modeling_vqmoe.VQMoEOlmoeForCausalLM"}})
    out.setdefault("pad_token_id", None)
    out.setdefault("bos_token_id", None)
    out.setdefault("eos_token_id", None)
    return out


def hf_state(model: torch.nn.Module, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """The Hugging Face tensors (per-expert layout; VQMoE layers with `vq_keys`) of a model built at ep=1."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    D = cfg.d_model
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    F = cfg.moe_config(0).ffn_hidden_size
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = sd[q + "ln1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "ln2.weight"]
        for n, w in zip("qkv", sd[q + "attn.c_attn.weight"].split(D)):
            out[f"{p}self_attn.{n}_proj.weight"] = w
        out[p + "self_attn.o_proj.weight"] = sd[q + "attn.c_proj.weight"]
        out[p + "self_attn.q_norm.weight"] = sd[q + "attn.q_norm.weight"]
        out[p + "self_attn.k_norm.weight"] = sd[q + "attn.k_norm.weight"]
        if has_router(cfg, i):
            out[p + "mlp.gate.weight"] = sd[q + "ffn.router.wg.weight"]
        for theirs, ours, _ in vq_keys(cfg, i):
            out[theirs] = sd[ours]
        for j in range(cfg.moe.num_experts):
            e, x = expert_prefix(i, j), f"{p}mlp.experts.{j}."
            gate, up = sd[e + "fc1.weight"].split(F)
            out[x + "gate_proj.weight"], out[x + "up_proj.weight"] = gate, up
            out[x + "down_proj.weight"] = sd[e + "fc2.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def check_export_folder(out_dir: str, overwrite: bool) -> None:
    """``--out`` must be a new or empty folder, or ``overwrite`` given (one line otherwise)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise CheckpointError(f"--out {out_dir} is not empty: give a new folder, or --overwrite to replace its "
                              f"contents")


def copy_tokenizer(record: Optional[Dict[str, Any]], dst: str) -> Optional[Dict[str, Any]]:
    """Copy the files of a checkpoint's tokenizer record (its ``vocab_file``; a Hugging Face tokenizer with the
    files beside it) into ``dst``; returns the record pointing there (None: nothing recorded or nothing to copy)."""
    if not record or not record.get("vocab_file"):
        return record
    src = record["vocab_file"]
    if not os.path.isfile(src):
        raise CheckpointError(f"the checkpoint's tokenizer file {src} does not exist: restore it, or pass the "
                              f"model's tokenizer to the tool that reads the checkpoint")
    os.makedirs(dst, exist_ok=True)
    names = [os.path.basename(src)]
    if record.get("kind") == "hf":
        names += [n for n in TOKENIZER_FILES if n not in names and os.path.isfile(os.path.join(os.path.dirname(src), n))]
    for name in names:
        shutil.copyfile(os.path.join(os.path.dirname(src), name), os.path.join(dst, name))
    return dict(record, vocab_file=os.path.abspath(os.path.join(dst, os.path.basename(src))))


def export_hf(load_dir: str, tag: Optional[str], out_dir: str, shard_bytes: int = SHARD_BYTES,
              overwrite: bool = False) -> Dict[str, Any]:
    """Write ``out_dir`` as ``save_pretrained`` would (config.json, model.safetensors or shards with their index, the
    tokenizer the checkpoint recorded; a VQMoE model: the remote-code package too) plus its SHA-256 manifest.  The
    folder is written beside ``out_dir`` and moved into place when complete.  Returns {"tensors", "parameters",
    "shards", "architecture", "source", "notice"}."""
    from safetensors.torch import save_file

    from ..data.errors import require_output
    from .manifest import FOLDER_MANIFEST, write_manifest
    from .read import load_lm, read_run

    run = read_run(load_dir, tag)
    kind = exportable(run.model_config)
    check_export_folder(out_dir, overwrite)
    require_output(out_dir, "--out", "folder")
    model, run, _ = load_lm(load_dir, tag)
    cfg = model.cfg
    tensors = hf_state(model, cfg)
    meta = run.client_state.get("converted_from") or {}
    original = meta.get("hf_config")
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += n
    stage = os.path.normpath(out_dir) + ".partial"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(stage, name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        with open(os.path.join(stage, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    hf_cfg = hf_config_for(cfg, original)
    with open(os.path.join(stage, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if kind == "vqmoe":
        for name in REMOTE_FILES:
            shutil.copyfile(os.path.join(REMOTE_DIR, name), os.path.join(stage, name))
    copy_tokenizer(run.client_state.get("tokenizer") if (run.client_state.get("tokenizer") or {}).get("kind") == "hf"
                   else None, stage)
    write_manifest(os.path.join(stage, FOLDER_MANIFEST), stage,
                   [n for n in os.listdir(stage) if n != FOLDER_MANIFEST])
    if os.path.isdir(out_dir):  # empty, or --overwrite
        shutil.rmtree(out_dir)
    os.replace(stage, out_dir)
    m = cfg.moe_config(0)
    notice = None
    if m.drop_tokens:
        notice = (f"the model drops routes beyond capacity (eval capacity factor {m.eval_capacity_factor}); the "
                  f"exported model is dropless, so its outputs equal this project's where no route is dropped")
    return {"tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values())),
            "shards": len(shards), "source": run.path, "architecture": hf_cfg["architectures"][0], "notice": notice}
