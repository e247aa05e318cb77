"""The CUDA nearest_code kernel against the CPU kernel and the torch path (needs a GPU).

All implementations evaluate the same fp64 reference formula for the final decision, so the CUDA
results must equal the CPU ones bit for bit: indices and distances.  (That nvcc compiles the source
is checked without a GPU in test_nearest_code.py.)
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from vqmoe_ds.kernels import kernel_available, nearest_code  # noqa: E402

DISTANCES = ["l2", "cosine"]


def reference(x, V, distance):
    """CPU answer: the compiled CPU kernel if built, else the torch path (identical by contract)."""
    return nearest_code(x.cpu(), V.cpu(), distance, impl="auto", return_distances=True)


def check(x, V, distance):
    ref_i, ref_d = reference(x, V, distance)
    impls = ["torch"] + (["cuda"] if kernel_available("cuda") else [])
    for impl in impls:
        i, d = nearest_code(x.cuda(), V.cuda(), distance, impl=impl, return_distances=True)
        assert i.device.type == "cuda" and i.dtype == torch.long
        assert torch.equal(i.cpu(), ref_i), (impl, (i.cpu() != ref_i).nonzero()[:5].flatten().tolist())
        torch.testing.assert_close(d.cpu(), ref_d, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(nearest_code(x.cuda(), V.cuda(), distance, impl=impl).cpu(), ref_i)


def test_cuda_kernel_is_built():
    assert kernel_available("cuda")


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("T,K,d", [(1000, 16, 64), (3000, 300, 33), (257, 1, 7), (129, 5000, 256), (50, 70, 1)])
def test_random(distance, T, K, d):
    g = torch.Generator().manual_seed(T + K + d)
    x = torch.randn(T, d, generator=g)
    V = torch.randn(K, d, generator=g)
    x[::4] = V[torch.randint(0, K, (len(x[::4]),), generator=g)]
    check(x, V, distance)


@pytest.mark.parametrize("distance", DISTANCES)
def test_adversarial(distance):
    g = torch.Generator().manual_seed(1)
    V = torch.randn(200, 24, generator=g)
    V[100:140] = V[:40]  # duplicated codes in another code tile
    V[150, 3] = torch.nextafter(V[10, 3], torch.tensor(float("inf")))  # 1-ulp near twin
    x = torch.cat([V[[10, 110, 150]], torch.randn(500, 24, generator=g)])
    x[5:10] *= 1e18  # exact full-row path
    x[10:15] *= 1e-30
    x[20, 1] = float("nan")
    x[21, 0] = float("inf")
    check(x, V, distance)
    Vn = V.clone()
    Vn[77, 2] = float("nan")
    check(x, Vn, distance)


@pytest.mark.parametrize("distance", DISTANCES)
def test_strided_and_low_precision(distance):
    g = torch.Generator().manual_seed(2)
    big = torch.randn(600, 80, generator=g)
    x, V = big[::2, ::2], torch.randn(300, 40, generator=g)[::3]
    check(x, V, distance)
    check(torch.randn(40, 500, generator=g).t(), torch.randn(64, 40, generator=g), distance)
    for dt in (torch.bfloat16, torch.float16):
        check(x.to(dt), V.to(dt), distance)


def test_torch_compile_cuda():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 32, generator=g).cuda()
    V = torch.randn(50, 32, generator=g).cuda()

    def f(x, V):
        return V[nearest_code(x, V)]

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(x, V)
    assert torch.equal(out, f(x, V))
    torch._dynamo.reset()
