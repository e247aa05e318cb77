"""The clustering router's k-means across 2 ranks with different data: both ranks fit the same centroids, and
they are the k-means of the union of both ranks' kept samples."""
import sys

from common import finish, init

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from vqmoe_ds.quantizers.kmeans import kmeans  # noqa: E402
from vqmoe_ds.routers.cluster import ClusterRouter  # noqa: E402


def main(out_path):
    rank, world = init()
    torch.manual_seed(100 + rank)  # each rank keeps its own random samples
    router = ClusterRouter(6, 3, warmup_steps=2, distance="l2", process_group="world").train()
    g = torch.Generator().manual_seed(rank)
    for step in range(3):
        router.set_step(step)
        router(torch.randn(20, 6, generator=g) + 4 * rank)  # the two ranks see different data
    mine = router.samples_RD[:int(router.filled)].clone()
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([mine.shape[0]]))
    parts = [torch.zeros(int(s), 6) for s in sizes]
    dist.all_gather(parts, mine)
    cents = [torch.zeros(3, 6) for _ in range(world)]
    dist.all_gather(cents, router.centroids_ED.clone())
    expected = kmeans(torch.cat(parts), 3, iters=router.kmeans_iters, seed=0).float()
    torch.save({"fitted": router.fitted, "same": all(torch.equal(c, cents[0]) for c in cents),
                "err": (router.centroids_ED - expected).abs().max().item()}, f"{out_path}.{rank}")
    finish()


if __name__ == "__main__":
    main(sys.argv[1])
