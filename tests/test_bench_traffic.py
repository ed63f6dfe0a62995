"""Collective traffic counting (vlmo_ds.parallel.traffic) and tools/bench.py's layout mode.

Measured relations on 2 gloo ranks, tiny model, per training step and rank (f = 1/2, Psi = 4 B x 1,841,100):
    ZeRO-1 (ds_configs/zero1_fp32.json)  gradients 2.000 x minimum: DeepSpeed's default use_multi_rank_bucket_allreduce
                                          all-reduces each gradient bucket where a reduce-scatter would do;
                                          parameter all-gather 1.000 x minimum (f Psi after the optimizer step)
    ZeRO-2, use_multi_rank_bucket_allreduce=false, 2 micro-batches: gradients reduced to their owners (dist.reduce)
                                          once per micro-batch, 1.000 x minimum; all-gather 1.000 x minimum
    ZeRO-3 (zero3_fp32.json, every parameter partitioned): reduce-scatter 1.000 x minimum (+8 B partition padding);
                                          all-gather 0.500 x minimum: stage3_max_reuse_distance (1e9) exceeds the
                                          model, so a gathered parameter stays until its last use in the step and is
                                          gathered once per step, not once forward and once backward
    ZeRO-3, reuse distance 0, no prefetch: every use gathers again; all-gather 1.83 x minimum for the image-text step
                                          (3.5 forward passes per micro-batch through the shared attention, fewer
                                          through each modality expert), between 1 and the forward-pass count
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from vlmo_ds.parallel.pipeline_passes import image_text_passes
from vlmo_ds.parallel.traffic import RING_FACTOR, TrafficCounter, count_collectives, zero_minimum

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
PSI = 1_841_100 * 4  # tiny's trainable parameters, fp32


def test_ring_factors_by_hand():
    assert RING_FACTOR["all_reduce"](2) == 1.0 and RING_FACTOR["all_reduce"](4) == 1.5
    assert RING_FACTOR["all_gather"](4) == 0.75 and RING_FACTOR["reduce_scatter"](1) == 0.0
    counter = TrafficCounter()
    counter.add("all_reduce", "torch", 4, 1000)
    counter.add("reduce_scatter_tensor", "deepspeed", 4, 1000)
    counter.add("all_gather_into_tensor", "deepspeed", 4, 400)
    assert counter.total().per_rank == 1500 + 750 + 300
    assert counter.total(("all_gather", "reduce_scatter"), "deepspeed").payload == 1400
    assert counter.total(via="torch").calls == 1


def test_zero_minimum_formulas():
    n, p, b = 4, 1000, 2  # f = 3/4, Psi = 2000 bytes
    assert zero_minimum(0, n, p, b) == {"gradient_reduction": 3000, "parameter_all_gather": 0}
    assert zero_minimum(1, n, p, b, accumulation=3) == {"gradient_reduction": 1500, "parameter_all_gather": 1500}
    assert zero_minimum(2, n, p, b, accumulation=3) == {"gradient_reduction": 4500, "parameter_all_gather": 1500}
    # 600 partitioned: 2 x 3 x 3/4 x 1200 B gathered; 400 persistent: 3/4 x 800 B once after the step
    assert zero_minimum(3, n, p, b, persistent=400, accumulation=3) == {"gradient_reduction": 4500,
                                                                         "parameter_all_gather": 5400 + 600}
    assert zero_minimum(3, 1, p, b) == {"gradient_reduction": 0, "parameter_all_gather": 0}
    with pytest.raises(ValueError, match="stage"):
        zero_minimum(4, n, p, b)
    with pytest.raises(ValueError, match="persistent"):
        zero_minimum(3, n, p, b, persistent=p + 1)


def test_counting_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_distributed"):
        with count_collectives():
            pass


def hand_checked(rank, world):
    import deepspeed.comm as ds
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    originals = (dist.all_reduce, dist.all_gather, ds_comm.cdb.all_reduce, mappings.dist_all_gather_func)
    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank takes part in creating each group
    with count_collectives() as counter:
        dist.all_reduce(torch.ones(1000))  # 4000 B: 2 (N-1)/N x 4000 = 4000 B per rank
        ds.all_reduce(torch.ones(1000))  # DeepSpeed forwards to torch's all_reduce: counted once, as deepspeed
        ds.all_gather_into_tensor(torch.empty(1000), torch.ones(500))  # torch's function held by DeepSpeed's backend
        ds.reduce_scatter_fn(torch.empty(500), torch.ones(1000))
        mappings.dist_reduce_scatter_func(torch.empty(50), torch.ones(100))  # held by megatron-core since import
        dist.all_gather([torch.empty(250) for _ in range(world)], torch.ones(250))
        dist.broadcast(torch.zeros(10, dtype=torch.int64), src=0)
        dist._all_gather_base(torch.empty(8), torch.ones(4))  # deprecated: calls all_gather_single inside
        dist.all_gather_object([None] * world, {"rank": rank})  # object sizes, then the bytes: two all_gathers
        dist.all_reduce(torch.ones(1000), group=alone)  # a group of one sends nothing
        dist.barrier()
        with pytest.raises(RuntimeError, match="already counting"):
            with count_collectives():
                pass
    restored = originals == (dist.all_reduce, dist.all_gather, ds_comm.cdb.all_reduce, mappings.dist_all_gather_func)
    return {key: (c.calls, c.payload, c.per_rank) for key, c in counter.ops.items()}, restored


@pytest.mark.slow
def test_counter_counts_hand_checked_collectives():
    for ops, restored in run_ranks(hand_checked, 2, use_deepspeed=True):
        assert restored
        gathered = ops.pop(("all_gather", "torch", 2))
        assert gathered[0] == 1 + 2 and gathered[1] > 2000  # the list all_gather (2000 B) and all_gather_object's two
        assert ops == {
            ("all_reduce", "torch", 2): (1, 4000, 4000.0),
            ("all_reduce", "deepspeed", 2): (1, 4000, 4000.0),
            ("all_gather_into_tensor", "deepspeed", 2): (1, 4000, 2000.0),
            ("reduce_scatter_tensor", "deepspeed", 2): (1, 4000, 2000.0),
            ("reduce_scatter_tensor", "megatron", 2): (1, 400, 200.0),
            ("broadcast", "torch", 2): (1, 80, 40.0),
            ("_all_gather_base", "torch", 2): (1, 32, 16.0),
            ("all_reduce", "torch", 1): (1, 4000, 0.0),
            ("barrier", "torch", 2): (1, 0, 0.0),
        }


def bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "traffic.json"
    text = subprocess.run([sys.executable, str(BENCH), "--ranks", "2", "--preset", "tiny", "--batch", "2",
                           "--steps", "1", "--json", str(out), *args], capture_output=True, text=True, check=True,
                          timeout=120).stdout
    for line in ("gradient reduction", "parameter all-gather", "forward passes"):
        assert line in text
    result = json.loads(out.read_text())
    assert result["model"]["trainable_parameters"] * 4 == PSI
    accumulation = result["batch"]["accumulation"]
    assert result["forward_passes"]["counted"] == result["forward_passes"]["analytic"]
    assert result["forward_passes"]["analytic"] == image_text_passes(4, 3) * accumulation == 3.5 * accumulation
    return result


def test_bench_help():
    text = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--ranks", "--zero-stage", "--zero KEY=VALUE", "--json"):
        assert flag in text


@pytest.mark.slow
def test_zero1_all_reduces_gradients_and_gathers_parameters_once(tmp_path):
    r = bench(tmp_path, "--zero-stage", "1")
    assert r["gradient_reduction"]["minimum"] == PSI / 2
    assert r["gradient_reduction"]["ratio"] == pytest.approx(2.0, abs=1e-5)  # + the gradient norm's 8 bytes
    assert r["parameter_all_gather"]["counted"] == PSI / 2


@pytest.mark.slow
def test_zero2_reduces_to_owners_each_micro_batch(tmp_path):
    r = bench(tmp_path, "--zero-stage", "2", "--zero", "use_multi_rank_bucket_allreduce=false",
              "--accumulation", "2")
    assert r["gradient_reduction"]["minimum"] == PSI  # 2 micro-batches x f Psi
    assert r["gradient_reduction"]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert {op["op"] for op in r["ops"] if op["via"] == "deepspeed"} == {"reduce", "all_reduce",
                                                                          "all_gather_into_tensor"}
    assert r["parameter_all_gather"]["counted"] == PSI / 2


@pytest.mark.slow
def test_zero3_keeps_gathered_parameters_within_the_reuse_distance(tmp_path):
    r = bench(tmp_path, "--zero-stage", "3", "--zero", "stage3_param_persistence_threshold=0")
    assert r["model"]["zero3_persistent"] == 0
    assert r["gradient_reduction"]["minimum"] == PSI / 2
    assert r["gradient_reduction"]["ratio"] == pytest.approx(1.0, abs=1e-5)  # partition padding: 8 B
    assert r["parameter_all_gather"]["minimum"] == PSI
    assert r["parameter_all_gather"]["ratio"] == pytest.approx(0.5, abs=1e-5)


@pytest.mark.slow
def test_zero3_without_reuse_gathers_for_every_pass(tmp_path):
    r = bench(tmp_path, "--zero-stage", "3", "--zero", "stage3_param_persistence_threshold=0",
              "--zero", "stage3_max_reuse_distance=0", "--zero", "stage3_prefetch_bucket_size=0")
    assert r["gradient_reduction"]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert 1.5 < r["parameter_all_gather"]["ratio"] < r["forward_passes"]["counted"]
