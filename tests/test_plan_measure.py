"""MemoryMeter on CPU counts the bytes of live tensors exactly, backward included."""
import torch
import torch.utils.checkpoint

from vlmo_ds.plan.measure import MemoryMeter

MIB = 2**20


def test_counts_new_storages_once_and_their_frees():
    with MemoryMeter("cpu") as m:
        x = torch.empty(MIB // 4)  # 1 MiB
        view = x[: MIB // 8]  # a view: no new bytes
        x.add_(1)  # in place: no new bytes
        y = x * 2  # 1 MiB
        assert m.now == 2 * MIB
        del x, view, y
        assert m.now == 0
        z = torch.empty(3 * MIB // 4)
    assert m.peak == 3 * MIB and m.now == 3 * MIB
    del z


def test_backward_ops_are_seen():
    a = torch.randn(MIB // 4, requires_grad=True)  # before entry: not counted
    with MemoryMeter("cpu") as m:
        loss = a.exp().exp().sum()  # saved for backward: both exp results (1 MiB each) and a 4-byte loss
        assert m.now == 2 * MIB + 4
        loss.backward()  # exp's backward makes 1 MiB while both results live; a.grad (1 MiB) stays
        del loss
    # the 3 MiB peak plus at most the 4-byte loss and its 4-byte incoming gradient
    assert 3 * MIB <= m.peak <= 3 * MIB + 8
    assert m.now == MIB and a.grad is not None


def test_checkpoint_recomputation_is_seen():
    a = torch.randn(MIB // 4, requires_grad=True)

    def f(t):
        return t.exp().exp()

    with MemoryMeter("cpu") as m:
        loss = torch.utils.checkpoint.checkpoint(f, a, use_reentrant=False).sum()
        assert m.now == 4  # the block's 2 MiB of outputs were not kept, only the loss
        loss.backward()  # recomputes both exp results, then the same 3 MiB as without checkpointing
        del loss
    assert 3 * MIB <= m.peak <= 3 * MIB + 16
    assert m.now == MIB


def test_storages_made_before_entry_are_not_counted_when_seen():
    weight, grad = torch.randn(MIB // 4), torch.zeros(MIB // 4)  # a parameter and its gradient, made before
    with MemoryMeter("cpu") as m:
        view = weight[: MIB // 8]  # a view of the parameter (a linear's transpose, ...): no new bytes
        grad.add_(weight)  # accumulation into an existing gradient: no new bytes
        y = weight * 2  # 1 MiB
    assert m.peak == m.now == MIB
    del view, y
