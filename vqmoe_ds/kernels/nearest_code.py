"""Nearest codebook entry for every token: the VQ router's hot spot, as a fused custom op.

``torch.cdist(x, V).argmin(1)`` materialises a tokens x K distance matrix.  ``nearest_code`` returns the
same kind of answer with O(tokens) extra memory: the compiled kernels walk tiles of tokens and blocks
of codes, keep the score tile in cache, and only keep a running minimum per token.

Exact semantics (identical for every ``impl``; this is what the tests check)
--------------------------------------------------------------------------------
The fp32 expansion ``||v||^2 - 2 x.v`` that makes the search fast rounds differently from ``cdist``
(and differently for different tile shapes), so "the same argmin as cdist" is not a well-defined
target on near-ties.  We define the answer by an fp64 reference distance evaluated in a fixed order:

* ``l2``:     ``D[i, k] = sum_j (float64(x[i, j]) - float64(V[k, j]))**2`` summed over ``j = 0..d-1`` in
  order, no fused multiply-add.
* ``cosine``: ``D[i, k] = 1 - c``, ``c = dot / (|x_i| |V_k|)`` with ``dot = sum_j x_ij V_kj`` and
  ``|x| = sqrt(sum_j x_j**2)`` (same sequential fp64 sums); ``c = 0`` when either norm is 0.
* ``idx[i] = torch.argmin(D[i])``: the lowest index among the minima; a row that contains NaN gives
  the index of its first NaN (that is what ``torch.argmin`` does).  So a token with a NaN gives 0 (its
  whole row is NaN), a code with a NaN is chosen by every token whose row has no earlier NaN (the
  lowest such code), and an all-``inf`` row gives 0.  (For cosine, an inf in x makes the row NaN.)
* the returned distance is ``D[i, idx[i]]`` rounded to fp32 (may overflow to ``inf`` for huge inputs).

Every path ranks codes with a fast fp32 score, then re-checks with the fp64 formula every code whose
score lies within a proven rounding-error bound of the best score (see ``csrc/nearest_code.h``).  A
token with one such code is done; near-ties are decided exactly; tokens whose scale could overflow
fp32, or that hold NaN/inf, are evaluated exactly against all codes.  Because the fp64 formula is the
same expression in every path, the CPU kernel, the CUDA kernel and the torch path agree bit for bit,
ties and NaNs included, and agree with a brute-force fp64 distance matrix.

Inputs may be fp32, bf16 or fp16 (upcast exactly to fp32 for the fast score, fp64 for the re-check),
of any shape ``[T, d]`` / ``[K, d]`` and strides.  The outputs carry no gradient: callers give the
quantised vectors a straight-through gradient themselves, exactly as with a pure-torch argmin.

Implementations (``impl``): ``"torch"`` (pure torch, any device), ``"cpu"`` / ``"cuda"`` (the compiled
kernel; error if unavailable), ``"auto"`` (on the CPU the compiled kernel when available, otherwise the torch
path after exactly one warning; on a GPU the torch path: the CUDA kernel is opt-in, ``impl="cuda"`` or
``VQMOE_DS_CUDA_KERNEL=1``, until it has passed its tests on a GPU -- ``make gpu-check`` runs them).  The compiled extension is the one built by
``pip install -e .`` (``vqmoe_ds/kernels/_nearest_code_ext*.so``), else it is JIT-compiled with
``torch.utils.cpp_extension.load`` into ``$TORCH_EXTENSIONS_DIR`` on first use (set
``VQMOE_DS_KERNELS_JIT=0`` to forbid that).  ``VQMOE_DS_KERNELS=off`` ignores any build (pure torch).
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from typing import Tuple, Union

import torch

__all__ = ["nearest_code", "kernel_available"]

_DISTANCES = {"l2": 0, "cosine": 1}
_IMPLS = ("auto", "torch", "cpu", "cuda")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

# Constants of the rounding-error bound; must match csrc/nearest_code.h.
_U = 2.0 ** -24
_MIN_NORMAL = 2.0 ** -126
_SCALE_LIMIT = 1e36


# --------------------------------------------------------------------------------------------------
# Loading the compiled extension
# --------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_state = {"tried": False, "loaded": False, "how": None, "error": None, "warned": False}


def _try_load() -> None:
    if _state["tried"]:
        return
    with _lock:
        if _state["tried"]:
            return
        try:
            if os.environ.get("VQMOE_DS_KERNELS", "").lower() in ("off", "0", "torch"):
                raise RuntimeError("disabled by VQMOE_DS_KERNELS=off")
            errors = []
            if os.environ.get("VQMOE_DS_KERNELS_PREBUILT", "1") != "0":
                try:
                    importlib.import_module("vqmoe_ds.kernels._nearest_code_ext")
                    _state.update(loaded=True, how="prebuilt")
                except ImportError as e:  # not built (or built for another torch)
                    errors.append(f"prebuilt: {e}")
            if not _state["loaded"] and os.environ.get("VQMOE_DS_KERNELS_JIT", "1") != "0":
                try:
                    _jit_load()
                    _state.update(loaded=True, how="jit")
                except Exception as e:  # compiler missing or failing: fall back to torch
                    errors.append(f"jit: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
            if not _state["loaded"]:
                raise RuntimeError("; ".join(errors) or "JIT disabled by VQMOE_DS_KERNELS_JIT=0")
            # The kernel op's schema lives in C++; its fake (meta) implementation, for torch.compile,
            # is the shape rule shared with the torch path.
            torch.library.register_fake("vqmoe_ds::nearest_code_kernel")(_fake)
        except Exception as e:
            _state["error"] = str(e)
        finally:
            _state["tried"] = True


def _jit_load():
    from torch.utils import cpp_extension

    from . import _build

    cuda = torch.cuda.is_available() and _build.want_cuda(cpp_extension)
    sources = [os.path.join(_CSRC, s) for s in _build.CPU_SOURCES + (_build.CUDA_SOURCES if cuda else [])]
    cpp_extension.load(
        name="vqmoe_ds_nearest_code" + ("_cuda" if cuda else ""),
        sources=sources,
        extra_cflags=list(_build.CXX_FLAGS),
        extra_cuda_cflags=list(_build.NVCC_FLAGS),
        extra_ldflags=list(_build.LD_FLAGS),
        extra_include_paths=[_CSRC],
        with_cuda=cuda,
        is_python_module=True,
        verbose=False,
    )


def kernel_available(device_type: Union[str, torch.device]) -> bool:
    """True when the compiled nearest-code kernel can run on ``device_type`` ("cpu" or "cuda").

    May trigger the one-time JIT build (see the module docstring).
    """
    dev = torch.device(device_type).type
    if dev not in ("cpu", "cuda"):
        return False
    _try_load()
    if not _state["loaded"]:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("vqmoe_ds::nearest_code_kernel", dev.upper())


def kernel_status() -> dict:
    """How the extension was (or was not) loaded: for diagnostics and the benchmark."""
    _try_load()
    return {k: _state[k] for k in ("loaded", "how", "error")}


# --------------------------------------------------------------------------------------------------
# The pure-torch path.  It follows the same contract as the kernels (fast fp32 score, proven bound,
# exact fp64 re-check), in chunks of tokens so that its extra memory is bounded too.
# --------------------------------------------------------------------------------------------------
def _prepare_codebook(V32: torch.Tensor, mode: int):
    nv = _sqrt_rn(_seq_dot(V32, V32))  # exact |v_k| (sequential fp64)
    vmax = float(nv.max()) if nv.numel() else 0.0
    finite = bool(torch.isfinite(V32).all()) and vmax * vmax <= _SCALE_LIMIT
    if mode == 0:
        W = -2.0 * V32
        bias = (nv * nv).float()
    else:
        W = torch.where(nv[:, None] == 0, torch.zeros((), dtype=torch.float64, device=V32.device),
                        -V32.double() / nv[:, None]).float()
        bias = None
    return nv, vmax, finite, W, bias


def _sqrt_rn(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp64 square root.

    torch's CPU sqrt for float64 is not correctly rounded (measured on torch 2.13: sqrt of
    0x1.37aed7d3816d0p+1 comes out 1 ulp high), while C++ ``std::sqrt`` and CUDA's ``sqrt`` are IEEE
    exact.  numpy's sqrt is IEEE exact, so CPU tensors go through it; CUDA tensors use torch.sqrt.
    """
    if t.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.sqrt(t.detach().numpy()))
    return torch.sqrt(t)


def _by_feature(a: torch.Tensor) -> torch.Tensor:
    """fp64 copy with the feature dim first and contiguous, so the per-feature slices below are
    contiguous (slicing columns of a row-major tensor was 3x slower)."""
    return a.double().movedim(-1, 0).contiguous()


def _seq_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product in fp64, summed over the last dim strictly in order (matches the C++)."""
    at, bt = _by_feature(a), (_by_feature(b) if b is not a else None)
    bt = at if bt is None else bt
    acc = torch.zeros(torch.broadcast_shapes(a.shape[:-1], b.shape[:-1]), dtype=torch.float64, device=a.device)
    for j in range(at.shape[0]):
        acc = acc + at[j] * bt[j]
    return acc


def _exact_dist(x: torch.Tensor, v: torch.Tensor, mode: int, nx=None, nv=None) -> torch.Tensor:
    """fp64 reference distance between broadcastable row sets x[..., d] and v[..., d]."""
    if mode == 0:
        xt, vt = _by_feature(x), _by_feature(v)
        acc = torch.zeros(torch.broadcast_shapes(x.shape[:-1], v.shape[:-1]), dtype=torch.float64,
                          device=x.device)
        for j in range(xt.shape[0]):
            t = xt[j] - vt[j]
            acc = acc + t * t
        return acc
    dot = _seq_dot(x, v)
    den = nx * nv
    c = torch.where((nx == 0) | (nv == 0), torch.zeros_like(dot), dot / den)
    return 1.0 - c


def _torch_path(x: torch.Tensor, codebook: torch.Tensor, mode: int, return_distances: bool):
    T, d = x.shape
    K = codebook.shape[0]
    dev = x.device
    idx = torch.zeros(T, dtype=torch.long, device=dev)
    dist = torch.empty(T if return_distances else 0, dtype=torch.float32, device=dev)
    if T == 0:
        return idx, dist
    V32 = codebook.float().contiguous()
    # A codebook with NaN/inf (or too large for fp32 scores) sends every token to the exact path.
    nv, vmax, finite, W, bias = _prepare_codebook(V32, mode)
    rel = 4.0 * (d + 4) * _U
    abs_term = 8.0 * (d + 2) * _MIN_NORMAL
    chunk = max(1, min(T, (1 << 22) // K, 16384))
    inf32 = torch.tensor(float("inf"), device=dev)
    for t0 in range(0, T, chunk):
        X = x[t0:t0 + chunk].float()
        n = X.shape[0]
        nx = _sqrt_rn(_seq_dot(X, X))
        if mode == 0:
            a = nx + vmax
            ok = (nx <= _SCALE_LIMIT) & (a * a <= _SCALE_LIMIT)
            err2 = 2.0 * (rel * a * a + abs_term)
        else:
            ok = nx <= _SCALE_LIMIT
            err2 = 2.0 * (rel * nx + abs_term)
        if not finite:
            ok = torch.zeros_like(ok)
        ci = torch.zeros(n, dtype=torch.long, device=dev)
        cd = torch.zeros(n, dtype=torch.float64, device=dev)
        need_d = torch.zeros(n, dtype=torch.bool, device=dev)  # distance still to compute
        fast = ok.nonzero().squeeze(1)
        if fast.numel():
            Xf = X[fast]
            S = Xf @ W.t()
            if bias is not None:
                S = bias + S
            # Best and second-best score per token: the best code is the answer unless the second is
            # within the threshold (cheaper than counting candidates over the whole row).
            top = torch.topk(S, k=min(2, K), dim=1, largest=False)
            smin, amin = top.values[:, 0], top.indices[:, 0]
            thr_d = smin.double() + err2[fast]
            thr = thr_d.float()
            thr = torch.where(thr.double() < thr_d, torch.nextafter(thr, inf32), thr)
            single = top.values[:, 1] > thr if K > 1 else torch.ones_like(thr, dtype=torch.bool)
            ci[fast[single]] = amin[single]
            need_d[fast[single]] = True
            multi = (~single).nonzero().squeeze(1)
            if multi.numel():
                rows, ks = (S[multi] <= thr[multi][:, None]).nonzero(as_tuple=True)
                toks = fast[multi][rows]
                dd = _exact_dist(X[toks], V32[ks], mode, nx[toks] if mode else None,
                                 nv[ks] if mode else None)
                # Per token: minimum distance, then the lowest code index attaining it.
                best = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
                best.scatter_reduce_(0, toks, dd, reduce="amin")
                at_best = dd == best[toks]
                lowk = torch.full((n,), K, dtype=torch.long, device=dev)
                lowk.scatter_reduce_(0, toks[at_best], ks[at_best], reduce="amin")
                mt = fast[multi]
                ci[mt] = lowk[mt]
                cd[mt] = best[mt]
        slow = (~ok).nonzero().squeeze(1)
        if slow.numel():
            for s0 in range(0, slow.numel(), max(1, (1 << 20) // K)):
                sl = slow[s0:s0 + max(1, (1 << 20) // K)]
                D = _exact_dist(X[sl][:, None, :], V32[None, :, :], mode,
                                nx[sl][:, None] if mode else None, nv[None, :] if mode else None)
                ci[sl] = torch.argmin(D, dim=1)
                cd[sl] = D.gather(1, ci[sl][:, None]).squeeze(1)
        idx[t0:t0 + n] = ci
        if return_distances:
            nd = need_d.nonzero().squeeze(1)
            if nd.numel():
                cd[nd] = _exact_dist(X[nd], V32[ci[nd]], mode, nx[nd] if mode else None,
                                     nv[ci[nd]] if mode else None)
            dist[t0:t0 + n] = cd.float()
    return idx, dist


@torch.library.custom_op("vqmoe_ds::nearest_code_torch", mutates_args=())
def _nearest_code_torch_op(x: torch.Tensor, codebook: torch.Tensor, mode: int,
                           return_distances: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    # Registered as an opaque op (not traced by torch.compile) so that its fp64 re-check is never
    # fused or reordered by the compiler: its bits are part of the contract.
    return _torch_path(x, codebook, mode, return_distances)


def _fake(x, codebook, mode, return_distances):
    T = x.shape[0]
    return (x.new_empty((T,), dtype=torch.long),
            x.new_empty((T if return_distances else 0,), dtype=torch.float32))


torch.library.register_fake("vqmoe_ds::nearest_code_torch")(_fake)


def _setup_ctx(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _backward(ctx, grad_idx, grad_dist):
    return None, None, None, None


torch.library.register_autograd("vqmoe_ds::nearest_code_torch", _backward, setup_context=_setup_ctx)

# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _check(x_TD, codebook_KD, distance, impl):
    if not isinstance(x_TD, torch.Tensor) or not isinstance(codebook_KD, torch.Tensor):
        raise TypeError("nearest_code: x_TD and codebook_KD must be torch.Tensors; convert with torch.as_tensor")
    if x_TD.dim() != 2:
        raise ValueError(f"nearest_code: x_TD must be 2-D [tokens, d], got shape {tuple(x_TD.shape)}; "
                         "flatten leading dims with x.reshape(-1, x.shape[-1])")
    if codebook_KD.dim() != 2:
        raise ValueError(f"nearest_code: codebook_KD must be 2-D [K, d], got shape {tuple(codebook_KD.shape)}")
    if x_TD.shape[1] != codebook_KD.shape[1]:
        raise ValueError(f"nearest_code: feature sizes differ: x has d={x_TD.shape[1]}, codebook has "
                         f"d={codebook_KD.shape[1]}; project x or the codebook to the same d")
    if codebook_KD.shape[0] < 1:
        raise ValueError("nearest_code: the codebook is empty (K=0); pass at least one code")
    if x_TD.shape[1] < 1:
        raise ValueError("nearest_code: d=0 has no distances; pass vectors with at least one feature")
    for name, t in (("x_TD", x_TD), ("codebook_KD", codebook_KD)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"nearest_code: {name} has dtype {t.dtype}; use float32, bfloat16 or float16 "
                            f"(e.g. {name}.float())")
    if x_TD.device != codebook_KD.device:
        raise ValueError(f"nearest_code: x_TD is on {x_TD.device} but codebook_KD on {codebook_KD.device}; "
                         "move both to one device")
    if distance not in _DISTANCES:
        raise ValueError(f"nearest_code: distance={distance!r} is not supported; use 'l2' or 'cosine'")
    if impl not in _IMPLS:
        raise ValueError(f"nearest_code: impl={impl!r} is not supported; use one of {_IMPLS}")


def nearest_code(x_TD: torch.Tensor, codebook_KD: torch.Tensor, distance: str = "l2", impl: str = "auto",
                 return_distances: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Index of the nearest code for every token (see the module docstring for exact semantics).

    Args:
        x_TD: [T, d] tokens (fp32 / bf16 / fp16, any strides).
        codebook_KD: [K, d] codes, same device.
        distance: "l2" (argmin of squared Euclidean distance) or "cosine" (argmax of cosine similarity,
            i.e. argmin of 1 - cos).
        impl: "auto", "torch", "cpu" or "cuda".
        return_distances: also return the fp32 distance (squared L2, or 1 - cos) of the chosen code.

    Returns:
        ``idx`` (int64 [T]) or ``(idx, dist)`` with ``dist`` fp32 [T]; neither requires grad.
    """
    _check(x_TD, codebook_KD, distance, impl)
    mode = _DISTANCES[distance]
    if impl in ("cpu", "cuda") and x_TD.device.type != impl:
        raise ValueError(f"nearest_code: impl={impl!r} but the tensors are on {x_TD.device}; "
                         f"use impl='auto' or move the tensors to {impl}")
    if _use_kernel(x_TD.device.type, impl):
        idx, dist = torch.ops.vqmoe_ds.nearest_code_kernel(x_TD, codebook_KD, mode, return_distances)
    else:
        idx, dist = _nearest_code_torch_op(x_TD, codebook_KD, mode, return_distances)
    return (idx, dist) if return_distances else idx


@torch._dynamo.assume_constant_result
def _use_kernel(dev: str, impl: str) -> bool:
    """Kernel or torch path, decided in Python.

    Marked as a constant for torch.compile: the choice depends only on the build and the device, and
    the loader / dispatcher queries inside cannot be traced.  Under compile it runs once at trace time.
    """
    if impl == "torch":
        return False
    if impl in ("cpu", "cuda"):
        if not kernel_available(impl):
            raise RuntimeError(f"nearest_code: the compiled {impl} kernel is unavailable "
                               f"({_state['error'] or 'extension built without ' + impl}); rebuild with "
                               "`pip install --no-build-isolation --no-deps -e .` or use impl='auto'/'torch'")
        return True
    if dev == "cuda" and os.environ.get("VQMOE_DS_CUDA_KERNEL") != "1":
        return False  # opt-in (see the module docstring)
    ok = kernel_available(dev)
    if not ok and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"vqmoe_ds.kernels.nearest_code: no compiled kernel for {dev} "
                      f"({_state['error'] or 'extension built without ' + dev}); using the pure-torch path, "
                      "same results but slower. Build it with `pip install --no-build-isolation --no-deps -e .`",
                      RuntimeWarning, stacklevel=3)
    return ok
