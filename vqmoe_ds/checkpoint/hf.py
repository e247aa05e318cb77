"""Hugging Face checkpoints: the format (key map, config fields) and the import of an OLMoE folder as a driver
checkpoint (``tools/convert_hf.py`` is its command line); the export back to such a folder is `export.export_hf`
(``tools/export_checkpoint.py --format hf``), written in the same key map.

A Hugging Face folder is what ``save_pretrained`` writes: ``config.json`` and the weights in safetensors, one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``.  Supported architectures:
``OlmoeForCausalLM`` (model_type ``olmoe``) and ``VQMoEOlmoeForCausalLM`` (``vqmoe_olmoe``, what this module exports
for a VQMoE model).  OLMoE's block is this project's GPT block with RMSNorm, SwiGLU experts, RoPE, QK-norm over the
whole projection and no biases (`model_config_from_hf`); the keys map as

    model.embed_tokens.weight                          wte.weight
    model.layers.{i}.input_layernorm.weight            blocks.{i}.ln1.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.weight     blocks.{i}.attn.c_attn.weight (rows q, k, v)
    model.layers.{i}.self_attn.o_proj.weight           blocks.{i}.attn.c_proj.weight
    model.layers.{i}.self_attn.{q,k}_norm.weight       blocks.{i}.attn.{q,k}_norm.weight
    model.layers.{i}.post_attention_layernorm.weight   blocks.{i}.ln2.weight
    model.layers.{i}.mlp.gate.weight                   blocks.{i}.ffn.router.wg.weight
    expert j, per-expert layout:
      model.layers.{i}.mlp.experts.{j}.{gate,up}_proj.weight   ...deepspeed_experts.{j}.fc1.weight (rows gate, up)
      model.layers.{i}.mlp.experts.{j}.down_proj.weight        ...deepspeed_experts.{j}.fc2.weight
    expert j, fused 3-D layout (newer transformers):
      model.layers.{i}.mlp.experts.gate_up_proj [E, 2F, D]     ...deepspeed_experts.{j}.fc1.weight = [j]
      model.layers.{i}.mlp.experts.down_proj [E, D, F]         ...deepspeed_experts.{j}.fc2.weight = [j]
    model.norm.weight                                  ln_f.weight
    lm_head.weight                                     lm_head.weight (absent when tied)
    VQMoE layers (`vq_keys`; ``mlp.gate`` only in pretrain mode):
      model.layers.{i}.mlp.mix.{weight,bias}           blocks.{i}.ffn.mix.{weight,bias} (W_g, b_g)
      model.layers.{i}.mlp.codebook                    blocks.{i}.ffn.vq_router.quantizer.codebook
      model.layers.{i}.mlp.vq_{in,out}.{weight,bias}   ...quantizer.{in,out}_proj.{weight,bias} (low-dim codebook)
      model.layers.{i}.mlp.expert_bias                 blocks.{i}.ffn.router.expert_bias_E (aux-loss-free balancing)

A VQMoE model exports as a ``trust_remote_code`` package: ``configuration_vqmoe.py`` and ``modeling_vqmoe.py``
(copied from ``hf_remote/``) go into the folder and ``config.json``'s ``auto_map`` names them, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` builds OLMoE's decoder with VQMoE layers.
Those two files are code that transformers runs; this module reads such a folder back without them (the weights
are safetensors, the settings JSON).  Every export's ``config.json`` also records the model's full MoE settings
under ``vqmoe_ds`` (the training-only ones, e.g. the VQ loss weight, that transformers has no field for), and the
folder carries a SHA-256 manifest (``vqmoe_manifest.json``, `manifest`) that the import verifies.

The import writes a driver checkpoint through `store.save` (its marker holds every file's size and SHA-256, the
model config and the resolved run configuration, and ``imported``: the drivers load its weights and start the
optimizer, lr schedule and data fresh), resharded to ``ep_size`` ranks when asked (`reshard.reshard`), plus
``OUT/config.json`` (the resolved configuration ``run_config`` gives: ``tools/convert_hf.py`` passes the
pretraining driver's) and the tokenizer, copied to ``OUT/tokenizer/``.  Every check
(folder, config, architecture, shards, every tensor's shape, the ep size) runs before anything is written.  The
export writes the per-expert layout, which every transformers version reads (newer ones fuse it on load).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..models import ModelConfig
from ..moe.config import MoEConfig
from .layout import CheckpointError

SUPPORTED = {"OlmoeForCausalLM": "olmoe", "VQMoEOlmoeForCausalLM": "vqmoe_olmoe"}  # architecture -> model_type
TAG = "imported"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# config.json fields of a VQMoE export -> MoEConfig fields (the settings that shape the model or its routing)
VQ_HF_FIELDS = {"codebook_size": "codebook_size", "codebook_dim": "codebook_dim", "vq_distance": "vq_distance",
                "vq_scale": "vq_scale", "discrete_input": "discrete_input", "vqmoe_mode": "vqmoe_mode",
                "router_score_function": "score_function", "router_topk_scaling_factor": "topk_scaling_factor",
                "router_expert_bias": "expert_bias"}
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # buffers some older saves hold; recomputed here


def _supported() -> str:
    return ", ".join(f"{a} ({t})" for a, t in SUPPORTED.items())


# ---- reading a Hugging Face folder -------------------------------------------------------------------------
def read_hf_config(hf_dir: str) -> Dict[str, Any]:
    """The folder's config.json, its architecture checked against the supported ones."""
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"--hf-dir {hf_dir} is not a folder: give the folder save_pretrained wrote (config.json "
                              f"and *.safetensors)")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{hf_dir} has no config.json: give the folder save_pretrained wrote (config.json and "
                              f"*.safetensors)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): download it again") from None
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED and hf.get("model_type") in SUPPORTED.values() and not archs:
        arch = next(a for a, t in SUPPORTED.items() if t == hf["model_type"])
    if arch not in SUPPORTED:
        name = arch or f"model_type {hf.get('model_type')!r}"
        raise CheckpointError(f"{hf_dir}: architecture {name} is not supported: supported are {_supported()}")
    hf["_architecture"] = arch
    return hf


def _rope_theta(hf: Dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    # either record may carry the scaling (transformers 4 wrote rope_scaling, 5 writes rope_parameters): any kind
    # other than the plain rotary embedding, or a scaling factor, in either is refused
    kinds = [d.get(k) for d in (params, scaling) for k in ("rope_type", "type") if isinstance(d, dict) and d.get(k)]
    kind = next((k for k in kinds if k != "default"), None)
    if kind is None and any(isinstance(d, dict) and d.get("factor") not in (None, 1, 1.0) for d in (params, scaling)):
        kind = f"scaled by factor {(params.get('factor') or scaling.get('factor'))}"
    if kind is not None:
        raise CheckpointError(f"config.json: rope type {kind!r} is not supported (only the default rotary "
                              f"embedding): convert a model without rope scaling")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: Dict[str, Any], ep_size: int = 1) -> ModelConfig:
    """The ModelConfig of an OLMoE config.json (dropless; balance loss its ``router_aux_loss_coef``, router z-loss
    0.001 as OLMoE was trained), or of a VQMoE export (its VQ settings; the rest of its MoE settings from the
    ``vqmoe_ds`` record this project writes, config.json's own fields winning).  Settings this model cannot express
    are one-line errors."""
    def need(key):
        if key not in hf:
            raise CheckpointError(f"config.json lacks {key!r}, which an {hf['_architecture']} config has: "
                                  f"download it again")
        return hf[key]

    D, H = int(need("hidden_size")), int(need("num_attention_heads"))
    unsupported = [(hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r} (only silu)"),
                   (int(hf.get("num_key_value_heads") or H) != H,
                    f"num_key_value_heads {hf.get('num_key_value_heads')} != num_attention_heads {H} "
                    f"(grouped-query attention)"),
                   (hf.get("head_dim") not in (None, D // H), f"head_dim {hf.get('head_dim')} != hidden_size / heads"),
                   (bool(hf.get("attention_bias")), "attention_bias true"),
                   (hf.get("clip_qkv") is not None, f"clip_qkv {hf.get('clip_qkv')}")]
    for bad, what in unsupported:
        if bad:
            raise CheckpointError(f"config.json: {what} is not supported: convert a model without it")
    E = int(need("num_experts"))
    if ep_size < 1 or E % ep_size:
        raise CheckpointError(f"--ep-size {ep_size} does not divide the {E} experts: choose a divisor of {E}")
    k, norm = int(need("num_experts_per_tok")), bool(hf.get("norm_topk_prob", False))
    moe = {"router": "topk", "num_experts": E, "top_k": k, "norm_topk_prob": norm,
           "balance_loss_coef": float(hf.get("router_aux_loss_coef", 0.01)), "z_loss_coef": 0.001,
           "drop_tokens": False, "ep_size": ep_size}
    if k == 1:  # OLMoE renormalises the chosen probabilities at every k: one route, weight 1
        moe["top1_weight"] = "one" if norm else "score"
    if SUPPORTED[hf["_architecture"]] == "vqmoe_olmoe":
        moe.update(router="vqmoe", **{ours: need(theirs) for theirs, ours in VQ_HF_FIELDS.items()})
    ours = hf.get("vqmoe_ds")  # an export of this project: its training-only MoE settings (config.json wins)
    if ours is not None:
        saved = ours.get("moe") if isinstance(ours, dict) else None
        known = set(MoEConfig.setting_names())  # a retired key is refused too: the record is the export's own
        if not isinstance(saved, dict) or set(saved) - known:
            raise CheckpointError(f"config.json: its vqmoe_ds record is not a mapping of MoE settings (unknown: "
                                  f"{sorted(set(saved or {}) - known)[:3]}): export the model again")
        moe = {**saved, **moe, "z_loss_coef": saved.get("z_loss_coef", 0.0)}
        if k == 1 and "norm_topk_prob" in saved:  # config.json's flag set top1_weight; k = 1 ignores this one
            moe["norm_topk_prob"] = saved["norm_topk_prob"]
    try:
        return ModelConfig(model="gpt", vocab_size=int(need("vocab_size")), n_layer=int(need("num_hidden_layers")),
                           n_head=H, d_model=D, d_inner=int(need("intermediate_size")),
                           seq_len=int(hf.get("max_position_embeddings", 4096)),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                           init_std=float(hf.get("initializer_range", 0.02)), normalization="RMSNorm",
                           norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)), swiglu=True,
                           position_embedding_type="rope", rotary_base=_rope_theta(hf), qk_norm="hidden",
                           add_bias_linear=False, moe=MoEConfig.from_settings(moe))
    except ValueError as e:
        raise CheckpointError(f"config.json describes no model this project can build: {e}") from None


class HFWeights:
    """The tensors of a folder's safetensors files (sharded or not), read lazily: names, shapes, values."""

    def __init__(self, hf_dir: str):
        from safetensors import SafetensorError, safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.isfile(os.path.join(hf_dir, name)):
                    raise CheckpointError(f"{hf_dir} is missing shard {name} (listed in model.safetensors.index.json): "
                                          f"download it again")
        else:
            files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{hf_dir} has no *.safetensors weights: save the model with save_pretrained "
                                      f"(safe_serialization, the default)")
        self.where: Dict[str, str] = {}
        self.handles = {}
        for name in files:
            try:
                h = safe_open(os.path.join(hf_dir, name), "pt")
            except (OSError, SafetensorError) as e:
                raise CheckpointError(f"{os.path.join(hf_dir, name)} is not a safetensors file "
                                      f"({str(e).splitlines()[0][:100]}): download it again") from None
            self.handles[name] = h
            for key in h.keys():
                self.where[key] = name

    def keys(self) -> List[str]:
        return sorted(self.where)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)


def expert_prefix(i: int, j: int) -> str:
    return f"blocks.{i}.ffn.moe.deepspeed_moe.experts.deepspeed_experts.{j}."


def vq_keys(cfg: ModelConfig, i: int) -> List[Tuple[str, str, Tuple[int, ...]]]:
    """(Hugging Face key, our key, shape) of layer ``i``'s VQMoE tensors beyond OLMoE's (none for a top-k layer)."""
    m = cfg.moe_config(i)
    if m.router != "vqmoe":
        return []
    D, C, E = cfg.d_model, m.codebook_dim or cfg.d_model, m.num_experts
    p, q = f"model.layers.{i}.mlp.", f"blocks.{i}.ffn."
    out = [(p + "codebook", q + "vq_router.quantizer.codebook", (m.codebook_size, C))]
    if C != D:
        out += [(p + "vq_in.weight", q + "vq_router.quantizer.in_proj.weight", (C, D)),
                (p + "vq_in.bias", q + "vq_router.quantizer.in_proj.bias", (C,)),
                (p + "vq_out.weight", q + "vq_router.quantizer.out_proj.weight", (D, C)),
                (p + "vq_out.bias", q + "vq_router.quantizer.out_proj.bias", (D,))]
    if m.vqmoe_mode == "pretrain":
        out += [(p + "mix.weight", q + "mix.weight", (2, D)), (p + "mix.bias", q + "mix.bias", (2,))]
        if m.expert_bias:
            out.append((p + "expert_bias", q + "router.expert_bias_E", (E,)))
    return out


def has_router(cfg: ModelConfig, i: int) -> bool:
    m = cfg.moe_config(i)
    return not (m.router == "vqmoe" and m.vqmoe_mode == "discrete_only")


def expected_shapes(cfg: ModelConfig, fused: bool) -> Dict[str, Tuple[int, ...]]:
    """Every Hugging Face key of ``cfg``'s OLMoE (or VQMoE) layout with the shape its config.json implies."""
    D, V, L, F, E = cfg.d_model, cfg.vocab_size, cfg.n_layer, cfg.expert_ffn or cfg.d_inner, cfg.moe.num_experts
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            out[f"{p}self_attn.{n}_proj.weight"] = (D, D)
        out.update({f"{p}self_attn.q_norm.weight": (D,), f"{p}self_attn.k_norm.weight": (D,),
                    f"{p}input_layernorm.weight": (D,), f"{p}post_attention_layernorm.weight": (D,)})
        if has_router(cfg, i):
            out[f"{p}mlp.gate.weight"] = (E, D)
        out.update({theirs: shape for theirs, _, shape in vq_keys(cfg, i)})
        if fused:
            out[f"{p}mlp.experts.gate_up_proj"] = (E, 2 * F, D)
            out[f"{p}mlp.experts.down_proj"] = (E, D, F)
        else:
            for j in range(E):
                out.update({f"{p}mlp.experts.{j}.gate_proj.weight": (F, D), f"{p}mlp.experts.{j}.up_proj.weight": (F, D),
                            f"{p}mlp.experts.{j}.down_proj.weight": (D, F)})
    return out


def check_weights(weights: HFWeights, cfg: ModelConfig, hf_dir: str) -> bool:
    """Every key of the layout present with its config's shape, no unknown key; returns whether the experts are in
    the fused 3-D layout."""
    keys = set(weights.keys())
    fused = "model.layers.0.mlp.experts.gate_up_proj" in keys
    want = expected_shapes(cfg, fused)
    missing = sorted(set(want) - keys)
    if missing:
        raise CheckpointError(f"{hf_dir} lacks {missing[0]} ({len(missing)} tensor(s) missing) that its config.json "
                              f"implies: download the weights again, or fix config.json")
    extra = sorted(k for k in keys - set(want) if not IGNORED_KEYS.match(k))
    if extra:
        raise CheckpointError(f"{hf_dir} holds {extra[0]} ({len(extra)} tensor(s)) that its config.json does not "
                              f"describe (e.g. more layers or experts): fix config.json or the weights")
    for key, shape in want.items():
        got = weights.shape(key)
        if got != shape:
            raise CheckpointError(f"{hf_dir}: {key} has shape {list(got)}, config.json implies {list(shape)}: the "
                                  f"shapes disagree with the config; fix config.json or download the weights again")
    return fused


def state_from_hf(weights: HFWeights, cfg: ModelConfig, fused: bool) -> Dict[str, torch.Tensor]:
    """The model's state dict (ep=1 names, fp32) from the Hugging Face tensors."""
    f32 = lambda t: t.to(torch.float32)  # noqa: E731
    g = lambda k: f32(weights.get(k))  # noqa: E731
    sd = {"wte.weight": g("model.embed_tokens.weight"), "ln_f.weight": g("model.norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = g("lm_head.weight")
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        sd[q + "ln1.weight"] = g(p + "input_layernorm.weight")
        sd[q + "ln2.weight"] = g(p + "post_attention_layernorm.weight")
        sd[q + "attn.c_attn.weight"] = torch.cat([g(f"{p}self_attn.{n}_proj.weight") for n in "qkv"])
        sd[q + "attn.c_proj.weight"] = g(p + "self_attn.o_proj.weight")
        sd[q + "attn.q_norm.weight"] = g(p + "self_attn.q_norm.weight")
        sd[q + "attn.k_norm.weight"] = g(p + "self_attn.k_norm.weight")
        if has_router(cfg, i):
            sd[q + "ffn.router.wg.weight"] = g(p + "mlp.gate.weight")
        for theirs, ours, _ in vq_keys(cfg, i):
            sd[ours] = g(theirs)
        if fused:
            gate_up, down = g(p + "mlp.experts.gate_up_proj"), g(p + "mlp.experts.down_proj")
        for j in range(cfg.moe.num_experts):
            e = expert_prefix(i, j)
            if fused:
                sd[e + "fc1.weight"], sd[e + "fc2.weight"] = gate_up[j].clone(), down[j].clone()
            else:
                x = f"{p}mlp.experts.{j}."
                sd[e + "fc1.weight"] = torch.cat([g(x + "gate_proj.weight"), g(x + "up_proj.weight")])
                sd[e + "fc2.weight"] = g(x + "down_proj.weight")
    return sd


def find_tokenizer(hf_dir: str, tokenizer: Optional[str]) -> Optional[str]:
    """The folder holding tokenizer.json: ``tokenizer`` (a folder or the file itself), else ``hf_dir`` if it has one."""
    if tokenizer:
        folder = tokenizer if os.path.isdir(tokenizer) else os.path.dirname(os.path.abspath(tokenizer))
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise CheckpointError(f"--tokenizer {tokenizer} holds no tokenizer.json: give the tokenizer's folder or "
                                  f"its tokenizer.json")
        return folder
    return hf_dir if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else None


def import_hf(hf_dir: str, out_dir: str, ep_size: int = 1, tokenizer: Optional[str] = None,
              run_config: Optional[Callable[[ModelConfig, str], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Write OUT/checkpoints/imported (a driver checkpoint at ``ep_size`` ranks), OUT/config.json and
    OUT/tokenizer/; returns a summary.  Every input is checked before anything is written.  ``run_config(cfg,
    out_dir)``: the resolved configuration to record (the pretraining driver's, `training.lm.resolved_config_for`);
    none: the model and MoE sections only."""
    import deepspeed

    from ..data.errors import require_output
    from ..models import build_model, count_params
    from ..parallel import init_single_process
    from . import store
    from .read import minimal_ds_config

    from .manifest import FOLDER_MANIFEST, verify_manifest

    # an export of this project carries a manifest: every file is checked before any is read
    verified = os.path.isdir(hf_dir) and verify_manifest(os.path.join(hf_dir, FOLDER_MANIFEST), hf_dir, required=False,
                                                         what=f"--hf-dir {hf_dir}")
    hf = read_hf_config(hf_dir)
    cfg = spelled_out(model_config_from_hf(hf, ep_size))
    weights = HFWeights(hf_dir)
    fused = check_weights(weights, cfg, hf_dir)
    tok_dir = find_tokenizer(hf_dir, tokenizer)
    tok_record = None
    if tok_dir is not None:
        from ..data.tokenizers.hf import HFTokenizer

        tok_meta = HFTokenizer(os.path.join(tok_dir, "tokenizer.json")).to_metadata("int32")
        if tok_meta.vocab_size > cfg.vocab_size:
            raise CheckpointError(f"the tokenizer in {tok_dir} has {tok_meta.vocab_size} tokens, the model only "
                                  f"{cfg.vocab_size}: give the model's own tokenizer")
    if os.path.exists(os.path.join(out_dir, "checkpoints")):
        raise CheckpointError(f"--out-dir {out_dir} already holds checkpoints/: give a new folder")
    require_output(out_dir, "--out-dir", "folder")
    # ---- everything checked: build, load, save ------------------------------------------------------------
    if tok_dir is not None:
        dst = os.path.join(out_dir, "tokenizer")
        os.makedirs(dst, exist_ok=True)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tok_dir, name)):
                shutil.copyfile(os.path.join(tok_dir, name), os.path.join(dst, name))
        tok_record = dict(tok_meta.__dict__, vocab_file=os.path.abspath(os.path.join(dst, "tokenizer.json")))
    one = cfg.replace_moe(ep_size=1)
    init_single_process()
    torch.manual_seed(0)
    model = build_model(one)
    state = model.state_dict()
    mapped = state_from_hf(weights, one, fused)
    unknown = sorted(set(mapped) - set(state))
    if unknown:  # a mapping bug, not a user error
        raise RuntimeError(f"mapped keys the model does not have: {unknown[:3]}")
    state.update(mapped)
    model.load_state_dict(state, strict=True)
    engine, _, _, _ = deepspeed.initialize(model=model, config=minimal_ds_config())
    source = {"format": "hf", "architecture": hf["_architecture"], "source": os.path.abspath(hf_dir),
              "expert_layout": "fused" if fused else "per_expert",
              "hf_config": {k: v for k, v in hf.items() if not k.startswith("_")}}
    resolved = run_config or (lambda c, _: {"model": {k: v for k, v in c.to_dict().items() if k != "moe"},
                                             "moe": c.moe.settings()})
    imported = {k: source[k] for k in ("format", "architecture", "source", "expert_layout")}

    def named(c):  # the resolved configuration names what was imported, not a named shape of this project
        out = resolved(c, out_dir)
        if "config" in out:
            out["config"] = None
        return {**out, "imported": imported}

    rc = named(cfg)
    client = {"step": 0, "model_config": one.to_dict(), "world_size": 1, "converted_from": source}
    if tok_record is not None:
        client["tokenizer"] = tok_record
    save_dir = os.path.join(out_dir, "checkpoints")
    marker = {"imported": imported}
    if ep_size == 1:
        store.save(engine, save_dir, TAG, client, config=rc, model=model, step=0, marker_extra=marker)
        path = os.path.join(save_dir, TAG)
    else:  # saved at one rank, then laid out for ep_size ranks (each a rank of its own expert-parallel group)
        from .reshard import reshard

        staging = os.path.join(out_dir, ".staging")
        store.save(engine, staging, TAG, client, config=named(one), model=model, step=0,
                   marker_extra=marker)
        path = reshard(staging, TAG, save_dir, TAG, ep_size, ep_size)
        shutil.rmtree(staging, ignore_errors=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(rc, f, indent=1)
    c = count_params(cfg)
    return {"checkpoint": path, "architecture": hf["_architecture"], "expert_layout": source["expert_layout"],
            "ep_size": ep_size, "parameters": c["total"], "active": c["active"],
            "tokenizer": tok_record["vocab_file"] if tok_record else None, "verified": verified,
            "router": cfg.moe.router}


def spelled_out(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every MoE setting of its first MoE layer given (not only those that differ from the defaults), so
    that a run started from its config.json builds exactly this model whatever ``--config`` shape it names."""
    m = cfg.moe_config(cfg.moe_layer_ids()[0])
    return cfg.replace(moe=MoEConfig.from_settings(m.all_settings()))
