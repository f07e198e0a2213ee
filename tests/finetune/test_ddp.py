"""``fit`` under torch.distributed: two gloo processes on the CPU keep identical weights."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import derived_seed

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _worker(rank: int, world: int, init_file: str, out_dir: str, seed: int) -> None:
    import dsrewrite
    from dsrewrite.finetune import fit
    from tests.finetune.test_finetune import Net

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(seed)  # the same models and data on every rank; the sampler splits the data
        teacher = Net().eval()
        x = torch.randn(24, 3, 8, 8)
        y = torch.randint(0, 5, (24,))
        student = dsrewrite.rewrite(teacher, x[:2], rank=2, measure_time=False).model
        start = {k: v.detach().clone() for k, v in student.named_parameters()}
        ds = torch.utils.data.TensorDataset(x, y)
        sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=True, seed=seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)
        history = fit(student, teacher, loader, epochs=2, train="all", lr=1e-2, progress=False)
        params = {k: v.detach().clone() for k, v in student.named_parameters()}
        torch.save({"start": start, "params": params, "epochs": history.epochs, "losses": history.losses},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_fit_keeps_replicas_identical(tmp_path):
    seed = derived_seed("ddp", 16)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), seed), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert any(not torch.equal(r0["start"][k], r0["params"][k]) for k in r0["params"])  # it trained
    assert r0["losses"] != r1["losses"]  # the ranks saw different batches, so equality came from DDP
    assert [e["loss"] for e in r0["epochs"]] == [e["loss"] for e in r1["epochs"]]  # reduced over ranks
    assert len(r0["losses"]) == 2 * 3  # 24 samples / 2 ranks / batch 4, two epochs
