"""vqmoe_ds.kernels.nearest_code: the CPU kernel and the torch path against an independent fp64 oracle.

The oracle below is written with numpy (not the library's helpers): it builds the whole T x K distance
matrix with the documented formula (fp64, summed over d in order) and takes torch.argmin of each row.
Both implementations must reproduce its indices exactly and its distances bit for bit, on random and
adversarial inputs (ties, 1-ulp near-ties, duplicated codes, huge/tiny magnitudes, NaN/inf, zero
vectors, K=1, d=1, strided inputs, bf16/fp16), and must agree with each other on larger inputs.
"""
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest
import torch

from vqmoe_ds.kernels import kernel_available, nearest_code

nc_mod = importlib.import_module("vqmoe_ds.kernels.nearest_code")

HAVE_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_cpu_kernel = pytest.mark.skipif(not kernel_available("cpu"), reason="compiled CPU kernel unavailable")


# ----------------------------------------------------------------------------------------------------
# Independent oracle
# ----------------------------------------------------------------------------------------------------
def oracle(x, V, distance):
    X = x.float().numpy().astype(np.float64)
    W = V.float().numpy().astype(np.float64)
    T, d = X.shape
    K = W.shape[0]
    with np.errstate(all="ignore"):
        if distance == "l2":
            D = np.zeros((T, K))
            for j in range(d):
                t = X[:, j, None] - W[None, :, j]
                D = D + t * t
        else:
            dot = np.zeros((T, K))
            nx2 = np.zeros(T)
            nv2 = np.zeros(K)
            for j in range(d):
                dot = dot + X[:, j, None] * W[None, :, j]
                nx2 = nx2 + X[:, j] * X[:, j]
                nv2 = nv2 + W[:, j] * W[:, j]
            nx, nv = np.sqrt(nx2)[:, None], np.sqrt(nv2)[None, :]
            c = np.where((nx == 0) | (nv == 0), 0.0, dot / (nx * nv))
            D = 1.0 - c
    Dt = torch.from_numpy(D)
    idx = torch.argmin(Dt, dim=1) if T else torch.zeros(0, dtype=torch.long)
    dist = Dt.gather(1, idx[:, None]).squeeze(1).float() if T else torch.zeros(0)
    return idx, dist


def impls():
    out = ["torch"]
    if kernel_available("cpu"):
        out.append("cpu")
    return out


def check(x, V, distance, impl_list=None):
    ref_i, ref_d = oracle(x, V, distance)
    for impl in impl_list or impls():
        i, d = nearest_code(x, V, distance, impl=impl, return_distances=True)
        assert i.dtype == torch.long and d.dtype == torch.float32
        assert torch.equal(i, ref_i), (impl, distance, (i != ref_i).nonzero()[:5].flatten().tolist())
        torch.testing.assert_close(d, ref_d, rtol=0, atol=0, equal_nan=True)
        # the indices-only call must give the same indices (it skips the distance work)
        assert torch.equal(nearest_code(x, V, distance, impl=impl), ref_i)


DISTANCES = ["l2", "cosine"]


# ----------------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_cpu_kernel_builds_when_a_compiler_exists():
    assert kernel_available("cpu"), nc_mod.kernel_status()


# ----------------------------------------------------------------------------------------------------
# Exactness against the oracle
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("T,K,d", [(257, 37, 5), (300, 200, 64), (64, 1500, 17), (50, 1, 3), (70, 9, 1), (0, 4, 3),
                                   (33, 300, 256)])
def test_random_matches_oracle(distance, T, K, d):
    g = torch.Generator().manual_seed(T * 7 + K + d)
    x = torch.randn(T, d, generator=g)
    V = torch.randn(K, d, generator=g)
    if T:
        x[::5] = V[torch.randint(0, K, (len(x[::5]),), generator=g)]  # exact hits: distance 0 / cos 1
    check(x, V, distance)


@pytest.mark.parametrize("distance", DISTANCES)
def test_duplicated_codes_and_exact_ties(distance):
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-3, 4, (20, 6), generator=g).float()
    V = torch.cat([base, base[[3, 7, 7, 0]], 2 * base[:5]])  # duplicates (and, for cosine, parallel codes)
    x = torch.cat([V[[23, 21, 3, 7, 0]], torch.randint(-3, 4, (200, 6), generator=g).float()])
    check(x, V, distance)
    # hand-computed: duplicates of a code resolve to its lowest index
    i = nearest_code(V[[21, 22, 23]], V, distance)
    assert i.tolist() == [7, 7, 0]


def test_equidistant_codes_pick_lowest_index():
    # x sits exactly between codes 1 and 2 (integers: every path is exact), codes 0 and 3 are farther.
    V = torch.tensor([[5.0, 5.0], [0.0, 1.0], [0.0, -1.0], [3.0, 0.0]])
    x = torch.zeros(1, 2)
    for impl in impls():
        i, d = nearest_code(x, V, impl=impl, return_distances=True)
        assert i.tolist() == [1] and d.tolist() == [1.0]


@pytest.mark.parametrize("distance", DISTANCES)
def test_one_ulp_near_ties(distance):
    # Every code has a twin one ulp away: fp32 scores cannot separate them, only the fp64 re-check can.
    g = torch.Generator().manual_seed(2)
    V = torch.randn(60, 16, generator=g)
    twin = V.clone()
    j = torch.randint(0, 16, (60,), generator=g)
    twin[torch.arange(60), j] = torch.nextafter(V[torch.arange(60), j], torch.tensor(float("inf")))
    Vall = torch.stack([V, twin], 1).reshape(120, 16)
    x = torch.cat([Vall[::3], torch.randn(150, 16, generator=g), twin[::2] + 1e-7])
    check(x, Vall, distance)


@pytest.mark.parametrize("distance", DISTANCES)
def test_large_and_tiny_magnitudes(distance):
    g = torch.Generator().manual_seed(3)
    V = torch.randn(40, 8, generator=g)
    x = torch.randn(90, 8, generator=g)
    x[:30] *= 1e18   # beyond the fp32-safe scale: exact full-row path
    x[30:45] *= 1e-30  # tiny: products underflow in fp32
    check(x, V, distance)
    check(x * 1e-20, V * 1e-20, distance)
    check(x[30:], V * 3e17, distance)  # huge codebook: every token on the exact path


@pytest.mark.parametrize("distance", DISTANCES)
def test_nan_and_inf(distance):
    g = torch.Generator().manual_seed(4)
    V = torch.randn(12, 5, generator=g)
    x = torch.randn(20, 5, generator=g)
    x[3, 2] = float("nan")
    x[5, 0] = float("inf")
    x[6] = float("-inf")
    check(x, V, distance)
    # torch.argmin semantics, by hand: a NaN row picks index 0; a NaN code is picked by everyone
    assert nearest_code(x[3:4], V, distance).tolist() == [0]
    Vn = V.clone()
    Vn[7, 1] = float("nan")
    Vn[9, 0] = float("nan")
    check(x, Vn, distance)
    # Rows that are all NaN give index 0: the NaN token, and for cosine also the inf tokens
    # (inf/inf); every other row's first NaN is code 7.
    i = nearest_code(x, Vn, distance)
    zero = [3] if distance == "l2" else [3, 5, 6]
    assert [k for k in range(20) if i[k] == 0] == zero and set(i[i != 0].tolist()) == {7}
    Vi = V.clone()
    Vi[2, 4] = float("inf")  # inf code, no NaN: exact path for every token
    check(x, Vi, distance)


def test_cosine_zero_vectors():
    V = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    x = torch.tensor([[0.0, 0.0], [3.0, 0.1], [-0.1, -5.0], [-2.0, -2.0]])
    check(x, V, "cosine")
    i, d = nearest_code(x, V, "cosine", return_distances=True)
    assert i.tolist() == [0, 1, 3, 3]  # zero token: cos 0 with every code -> lowest index
    assert d[0].item() == 1.0 and 0 <= d[3].item() < 1e-15  # 1 - cos rounds to 2^-52 here


@pytest.mark.parametrize("distance", DISTANCES)
def test_non_contiguous_and_low_precision(distance):
    g = torch.Generator().manual_seed(5)
    big = torch.randn(120, 40, generator=g)
    x = big[::2, ::2]            # both strides non-unit
    xt = torch.randn(20, 60, generator=g).t()  # transposed
    V = torch.randn(90, 20, generator=g)[::3]  # strided codebook
    check(x, V, distance)
    check(xt, V, distance)
    for dt in (torch.bfloat16, torch.float16):
        check(x.to(dt), V.to(dt), distance)
        check(x.to(dt), V, distance)  # mixed dtypes are fine: both are upcast exactly


@needs_cpu_kernel
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("tiles", [{"VQMOE_NC_TILE_TOKENS": "16", "VQMOE_NC_TILE_CODES": "8"},  # row-major blocks
                                   {"VQMOE_NC_TILE_TOKENS": "40", "VQMOE_NC_TILE_CODES": "100"},  # transposed blocks
                                   {"VQMOE_NC_TILE_TOKENS": "7", "VQMOE_NC_TILE_CODES": "1000",
                                    "VQMOE_NC_TILE_ELEMS": "1"},  # refine one row at a time
                                   {"VQMOE_NC_GEMM": "hand", "VQMOE_NC_TILE_TOKENS": "24",
                                    "VQMOE_NC_TILE_CODES": "37"}])  # the hand-written GEMM (measured alternative)
def test_cpu_tilings_agree(monkeypatch, distance, tiles):
    # The tile shape is read per call: the multi-block scan, both block orientations, odd tails and
    # the chunked near-tie path must all give the oracle's answer.
    for k, v in tiles.items():
        monkeypatch.setenv(k, v)
    g = torch.Generator().manual_seed(6)
    V = torch.randn(300, 12, generator=g)
    V[150:160] = V[10:20]  # duplicates in another block
    x = torch.cat([torch.randn(211, 12, generator=g), V[[15, 155, 299]]])
    check(x, V, distance, ["cpu"])


@needs_cpu_kernel
@pytest.mark.parametrize("distance", DISTANCES)
def test_cpu_kernel_matches_torch_path_at_scale(distance):
    # Larger than the oracle can afford: clustered data (many close codes) at a realistic size.
    g = torch.Generator().manual_seed(7)
    centers = torch.randn(64, 64, generator=g) * 3
    V = (centers[torch.randint(0, 64, (1024,), generator=g)] + 0.05 * torch.randn(1024, 64, generator=g))
    x = centers[torch.randint(0, 64, (20000,), generator=g)] + 0.05 * torch.randn(20000, 64, generator=g)
    a_i, a_d = nearest_code(x, V, distance, impl="cpu", return_distances=True)
    b_i, b_d = nearest_code(x, V, distance, impl="torch", return_distances=True)
    assert torch.equal(a_i, b_i)
    assert torch.equal(a_d, b_d)


def test_agrees_with_cdist_when_there_is_a_clear_winner():
    g = torch.Generator().manual_seed(8)
    V = torch.randn(256, 32, generator=g)
    x = V[torch.randint(0, 256, (4000,), generator=g)] + 0.01 * torch.randn(4000, 32, generator=g)
    ref = torch.cdist(x, V).argmin(1)
    for impl in impls():
        assert torch.equal(nearest_code(x, V, impl=impl), ref)
    refc = torch.nn.functional.normalize(x, dim=1).matmul(torch.nn.functional.normalize(V, dim=1).t()).argmax(1)
    for impl in impls():
        assert torch.equal(nearest_code(x, V, "cosine", impl=impl), refc)


# ----------------------------------------------------------------------------------------------------
# Autograd, torch.compile, op registration
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_no_gradient_and_straight_through(impl):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(50, 8, generator=g, requires_grad=True)
    V = torch.randn(10, 8, generator=g, requires_grad=True)
    i, d = nearest_code(x, V, impl=impl, return_distances=True)
    assert not i.requires_grad and not d.requires_grad
    q = V[i]
    out = x + (q - x).detach()  # straight-through, as callers do
    (out.sum() + ((q - x.detach()) ** 2).sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.allclose(V.grad, torch.zeros_like(V).index_add_(0, i, 2 * (q - x).detach()))


def test_opcheck_registrations():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(40, 6, generator=g)
    V = torch.randn(7, 6, generator=g)
    for mode in (0, 1):
        for rd in (False, True):
            torch.library.opcheck(torch.ops.vqmoe_ds.nearest_code_torch.default, (x, V, mode, rd))
            if kernel_available("cpu"):
                torch.library.opcheck(torch.ops.vqmoe_ds.nearest_code_kernel.default, (x, V, mode, rd))


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_torch_compile(impl):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(100, 16, generator=g)
    V = torch.randn(20, 16, generator=g)

    def quantize(x, V):
        i, d = nearest_code(x * 2.0, V, "l2", impl=impl, return_distances=True)
        return V[i], d.sum()

    torch._dynamo.reset()
    compiled = torch.compile(quantize, fullgraph=True, backend="aot_eager")
    q, s = compiled(x, V)
    q_ref, s_ref = quantize(x, V)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# Input errors and the fallback warning
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((torch.zeros(3, 4, 2), torch.zeros(5, 2)), {}, ValueError, "must be 2-D"),
    ((torch.zeros(3, 4), torch.zeros(5, 3)), {}, ValueError, "feature sizes differ"),
    ((torch.zeros(3, 4), torch.zeros(0, 4)), {}, ValueError, "codebook is empty"),
    ((torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5, 4)), {}, TypeError, "float32, bfloat16 or float16"),
    ((torch.zeros(3, 4), torch.zeros(5, 4)), {"distance": "dot"}, ValueError, "use 'l2' or 'cosine'"),
    ((torch.zeros(3, 4), torch.zeros(5, 4)), {"impl": "triton"}, ValueError, "impl='triton'"),
    ((torch.zeros(3, 4), torch.zeros(5, 4)), {"impl": "cuda"}, ValueError, "tensors are on cpu"),
])
def test_bad_input_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nearest_code(*args, **kwargs)


_WARN_SCRIPT = textwrap.dedent("""
    import warnings, torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as w:
        from vqmoe_ds.kernels import nearest_code, kernel_available
        x = torch.randn(30, 4); V = torch.randn(6, 4)
        a = nearest_code(x, V)
        b = nearest_code(x, V, "cosine", return_distances=True)
        c = nearest_code(x, V)
    ours = [str(m.message) for m in w if "nearest_code" in str(m.message)]
    assert not kernel_available("cpu")
    assert torch.equal(a, torch.cdist(x, V).argmin(1)) and torch.equal(a, c)
    print(len(ours)); print(ours[0] if ours else "")
""")


@pytest.mark.parametrize("env", [
    {"VQMOE_DS_KERNELS": "off"},
    # a real failed build: no prebuilt module, and a JIT compile whose compiler cannot run
    {"VQMOE_DS_KERNELS_PREBUILT": "0", "CXX": "/bin/false"},
])
def test_fallback_warns_exactly_once(tmp_path, env):
    full = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **env)
    r = subprocess.run([sys.executable, "-c", _WARN_SCRIPT], env=full, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "1", r.stdout
    assert "pure-torch path" in lines[1] and "pip install" in lines[1]


# ----------------------------------------------------------------------------------------------------
# The CUDA source compiles (compile only: this machine may have nvcc but no GPU)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """nvcc compiles the kernel against this torch's headers.  A success is remembered under the extension cache,
    keyed by the SHA-256 of the sources in csrc/, the command, nvcc's and torch's versions: the same inputs are
    compiled once per machine (about a minute of the suite's time)."""
    import hashlib

    import torch
    from torch.utils import cpp_extension

    from vqmoe_ds.kernels import _build

    inc = cpp_extension.include_paths()
    # CPU-only torch wheels ship the c10/cuda headers but not this generated one; supply it so the
    # compile check also runs there (a CUDA torch has it).
    shim = tmp_path / "shim"
    if not any(os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in inc):
        (shim / "c10/cuda/impl").mkdir(parents=True)
        (shim / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["nvcc", "-c", "-std=c++20", "-arch=sm_80", "-Xcompiler", "-fPIC", *_build.NVCC_FLAGS,
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-DTORCH_EXTENSION_NAME=_nearest_code_ext",
           *[f"-I{p}" for p in inc], f"-I{sysconfig.get_paths()['include']}", f"-I{shim}", f"-I{_build.CSRC}",
           os.path.join(_build.CSRC, "nearest_code_cuda.cu"), "-o", str(tmp_path / "k.o")]
    key = hashlib.sha256()
    for name in sorted(os.listdir(_build.CSRC)):
        with open(os.path.join(_build.CSRC, name), "rb") as f:
            key.update(name.encode() + b"\0" + f.read())
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    key.update("\0".join([*(c.replace(str(tmp_path), "TMP") for c in cmd), version, torch.__version__]).encode())
    cache = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache")),
                         "vqmoe_ds_nvcc_checks", key.hexdigest())
    if os.path.exists(cache):
        return
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "w") as f:
        f.write(f"compiled {(tmp_path / 'k.o').stat().st_size} bytes\n")


def test_cuda_kernel_is_opt_in(monkeypatch):
    """On CUDA, impl="auto" takes the compiled kernel only with VQMOE_DS_CUDA_KERNEL=1 (it has not passed its tests
    on a GPU yet), even where it is built; the CPU kernel stays automatic; impl="cuda" asks for it explicitly."""
    nc = importlib.import_module("vqmoe_ds.kernels.nearest_code")  # the module (the package exports the function)

    monkeypatch.setattr(nc, "kernel_available", lambda dev: True)
    monkeypatch.delenv("VQMOE_DS_CUDA_KERNEL", raising=False)
    assert nc._use_kernel("cuda", "auto") is False
    assert nc._use_kernel("cpu", "auto") is True
    assert nc._use_kernel("cuda", "cuda") is True
    monkeypatch.setenv("VQMOE_DS_CUDA_KERNEL", "1")
    assert nc._use_kernel("cuda", "auto") is True
