"""Collective traffic counting (vlmo_ds.parallel.traffic) and tools/bench.py's layout mode.

Measured relations on gloo ranks, tiny model, batch 2, per training step and rank (mean over ranks; f = 1/2 over 2
data-parallel ranks, Psi = 4 B x 1,841,100):
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
    TP=2 (2 ranks, ZeRO-0)               tensor-group all-reduces 1.000 x the formula, exactly: 68 calls, 8,507,392 +
                                          524 M bytes, M = B T text positions (traffic.tensor_parallel_all_reduce)
    TP=2 x PP=2 (4 ranks, ZeRO-1, CPU test mode)  all-reduces 1.000 x (half of the TP=2 figure: each stage does its
                                          blocks' share); pipeline sends 1.000 x, 496,688 B: [2, 97, 128] unimodal and
                                          [8, 97, 128] fused activations and their gradients over one boundary, plus
                                          four 24 B shape messages, averaged over 2 stages
    TP=2 + ZeRO-3 (4 ranks)              all-reduces 1.000 x; ZeRO gradient and parameter traffic 1.000 x the minimum
                                          of this rank's 986,024 parameters (tiny keeps every one whole: persistent)
    PP=2 + ZeRO-1 (4 ranks, CPU test mode)  sends 1.000 x; gradients 2.000 x as ZeRO-1 above
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from vlmo_ds.model.config import preset
from vlmo_ds.parallel.pipeline_passes import image_text_passes
from vlmo_ds.parallel.traffic import (RING_FACTOR, ImageTextShape, TrafficCounter, count_collectives, pipeline_p2p,
                                      tensor_parallel_all_reduce, zero_minimum)

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
PSI = 1_841_100 * 4  # tiny's trainable parameters, fp32


def test_ring_factors_by_hand():
    assert RING_FACTOR["all_reduce"](2) == 1.0 and RING_FACTOR["all_reduce"](4) == 1.5
    assert RING_FACTOR["all_gather"](4) == 0.75 and RING_FACTOR["reduce_scatter"](1) == 0.0
    counter = TrafficCounter()
    counter.add("all_reduce", "torch", 4, 1000, "tensor")
    counter.add("reduce_scatter_tensor", "deepspeed", 4, 1000, "data")
    counter.add("all_gather_into_tensor", "deepspeed", 4, 400, "data")
    counter.add("isend", "torch", 2, 100, "pipeline")
    assert counter.total().per_rank == 1500 + 750 + 300 + 100
    assert counter.total(("all_gather", "reduce_scatter"), "deepspeed").payload == 1400
    assert counter.total(via="torch").calls == 2
    assert counter.total(group="tensor").per_rank == 1500 and counter.total(("p2p",), group="data").calls == 0
    other = TrafficCounter()
    other.add("all_reduce", "torch", 4, 3000, "tensor")
    mean = TrafficCounter.mean([counter, other])
    assert mean.total(group="tensor").payload == 2000 and mean.total(group="tensor").calls == 1
    assert mean.total(group="pipeline").per_rank == 50


def test_zero_minimum_formulas():
    n, p, b = 4, 1000, 2  # f = 3/4, Psi = 2000 bytes
    assert zero_minimum(0, n, p, b) == {"gradient_reduction": 3000, "parameter_all_gather": 0}
    assert zero_minimum(1, n, p, b, accumulation=3) == {"gradient_reduction": 1500, "parameter_all_gather": 1500}
    assert zero_minimum(2, n, p, b, accumulation=3) == {"gradient_reduction": 4500, "parameter_all_gather": 1500}
    # 600 partitioned: 2 x 3 x 3/4 x 1200 B gathered; 400 persistent: 3/4 x 800 B once after the step
    assert zero_minimum(3, n, p, b, persistent=400, accumulation=3) == {"gradient_reduction": 4500,
                                                                         "parameter_all_gather": 5400 + 600}
    assert zero_minimum(3, 1, p, b) == {"gradient_reduction": 0, "parameter_all_gather": 0}
    # bf16 parameters (2 B) whose gradients are reduced in fp32 (4 B): only the gradient term doubles
    assert zero_minimum(1, n, p, b, bytes_per_grad=4) == {"gradient_reduction": 3000, "parameter_all_gather": 1500}
    assert zero_minimum(0, n, p, b, bytes_per_grad=4)["gradient_reduction"] == 6000
    with pytest.raises(ValueError, match="stage"):
        zero_minimum(4, n, p, b)
    with pytest.raises(ValueError, match="persistent"):
        zero_minimum(3, n, p, b, persistent=p + 1)


# B 1, T 2, I 3, D 4, L 2, S 1, M 1, 2 B per value; F = 4 fused rows
SMALL = ImageTextShape(batch=1, text_len=2, image_len=3, dim=4, depth=2, vlffn_start=1, masked=1, bytes_per_value=2)


def test_tensor_parallel_all_reduce_by_hand():
    # X = 2 x 1 x 5 (image + text) + 1 x 1 x 5 (VL paths) + 2 x 4 x 5 (fused) = 55 tokens through blocks
    assert SMALL.block_tokens() == 55
    # 4 x 55 x 4 x 2 (blocks) + (1 + 4) x 2 x 4 x 2 (embedding) + 1 x 4 x 2 (MLM decoder) + 3 x 1 x 4 (CE) = 1860
    assert tensor_parallel_all_reduce(SMALL, 2) == {"payload": 1860, "per_rank": 1860}
    assert tensor_parallel_all_reduce(SMALL, 4) == {"payload": 1860, "per_rank": 1.5 * 1860}
    assert tensor_parallel_all_reduce(SMALL, 2, pp=2)["per_rank"] == 930  # each stage does its share
    assert tensor_parallel_all_reduce(SMALL, 1) == {"payload": 0, "per_rank": 0}
    with pytest.raises(ValueError, match="at least 1"):
        tensor_parallel_all_reduce(SMALL, 0)


def test_pipeline_p2p_by_hand():
    # boundary entering block 1 (= S: the VL copies are made on the next stage): unimodal [1, 5, 4], fused [4, 5, 4];
    # each forward and its gradient back, 2 B a value, plus 4 shape messages of 24 B
    assert pipeline_p2p(SMALL, [1]) == {"payload": 2 * (40 + 160) + 96, "per_rank": 248}
    # entering block 2 > S: the image and text VL streams travel too, [1, 10, 4]
    assert pipeline_p2p(SMALL, [2])["payload"] == 2 * (80 + 160) + 96
    assert pipeline_p2p(SMALL, [1, 2]) == {"payload": 496 + 576, "per_rank": (496 + 576) / 3}
    assert pipeline_p2p(SMALL, []) == {"payload": 0, "per_rank": 0}


def test_counting_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_distributed"):
        with count_collectives():
            pass


def hand_checked(rank, world):
    import deepspeed.comm as ds
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    originals = (dist.all_reduce, dist.all_gather, dist.isend, ds_comm.cdb.all_reduce, mappings.dist_all_gather_func)
    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank takes part in creating each group
    pair, copy = dist.new_group([0, 1]), dist.new_group([0, 1])
    received = torch.zeros(3)
    with count_collectives({"pair": pair, "world": None}) as counter:
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
        dist.all_reduce(torch.ones(10), group=pair)  # the named group itself
        dist.all_reduce(torch.ones(20), group=copy)  # a copy: the first named group with its ranks
        # megatron's pipeline exchange: P2POp(torch.distributed.isend) checked by identity inside batch_isend_irecv
        peer = 1 - rank
        ops = [dist.P2POp(dist.isend, torch.full((3,), float(rank + 1)), peer, pair),
               dist.P2POp(dist.irecv, received, peer, pair)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        dist.barrier()
        with pytest.raises(RuntimeError, match="already counting"):
            with count_collectives():
                pass
    restored = originals == (dist.all_reduce, dist.all_gather, dist.isend, ds_comm.cdb.all_reduce,
                             mappings.dist_all_gather_func)
    return {key: (c.calls, c.payload, c.per_rank) for key, c in counter.ops.items()}, restored, received


@pytest.mark.slow
def test_counter_counts_hand_checked_collectives():
    for rank, (ops, restored, received) in enumerate(run_ranks(hand_checked, 2, use_deepspeed=True)):
        assert restored
        assert received.tolist() == [2.0 - rank] * 3  # the peer's tensor arrived
        gathered = ops.pop(("all_gather", "torch", 2, "world"))  # the default group is "world" itself
        assert gathered[0] == 1 + 2 and gathered[1] > 2000  # the list all_gather (2000 B) and all_gather_object's two
        assert ops == {
            ("all_reduce", "torch", 2, "world"): (1, 4000, 4000.0),
            ("all_reduce", "deepspeed", 2, "world"): (1, 4000, 4000.0),
            ("all_gather_into_tensor", "deepspeed", 2, "world"): (1, 4000, 2000.0),
            ("reduce_scatter_tensor", "deepspeed", 2, "world"): (1, 4000, 2000.0),
            ("reduce_scatter_tensor", "megatron", 2, "world"): (1, 400, 200.0),
            ("broadcast", "torch", 2, "world"): (1, 80, 40.0),
            ("_all_gather_base", "torch", 2, "world"): (1, 32, 16.0),
            ("all_reduce", "torch", 1, "other"): (1, 4000, 0.0),
            ("all_reduce", "torch", 2, "pair"): (2, 120, 120.0),  # `pair` itself, and `copy` by its ranks
            ("isend", "torch", 2, "pair"): (1, 12, 12.0),
            ("irecv", "torch", 2, "pair"): (1, 0, 0.0),
            ("barrier", "torch", 2, "world"): (1, 0, 0.0),
        }


def bench(tmp_path, ranks: int, *args: str) -> tuple[dict, str]:
    out = tmp_path / "traffic.json"
    run = subprocess.run([sys.executable, str(BENCH), "--ranks", str(ranks), "--preset", "tiny", "--batch", "2",
                          "--steps", "1", "--json", str(out), *args], capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout
    for line in ("ZeRO gradient reduction", "ZeRO parameter all-gather", "forward passes"):
        assert line in text
    result = json.loads(out.read_text())
    accumulation = result["batch"]["accumulation"]
    assert result["forward_passes"]["counted"] == result["forward_passes"]["analytic"]
    assert result["forward_passes"]["analytic"] == image_text_passes(4, 3) * accumulation == 3.5 * accumulation
    return result, text


def data_parallel(tmp_path, *args: str) -> dict:
    result, _ = bench(tmp_path, 2, *args)
    assert result["model"]["trainable_parameters"] * 4 == PSI
    return result


def test_bench_help():
    text = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--ranks", "--tensor", "--pipeline", "--cpu-pipeline", "CPU test mode", "--zero-stage",
                 "--zero KEY=VALUE", "--json"):
        assert flag in text


@pytest.mark.parametrize("args, message", [
    (("--ranks", "2", "--pipeline", "2", "--zero-stage", "2"),
     "bench.py: --pipeline=2 needs ZeRO stage 0 or 1 (DeepSpeed cannot partition gradients across pipeline "
     "stages); set --zero-stage=1"),
    (("--ranks", "3", "--tensor", "2"), "bench.py: parallel: 3 ranks are not divisible by --tensor x --pipeline"),
    (("--ranks", "2", "--pipeline", "2", "--zero-stage", "1"),
     "on CPU add --cpu-pipeline (CPU test mode) or use --pipeline 1"),
])
def test_bench_refuses_a_layout_in_one_line(args, message):
    if "--cpu-pipeline" in message and torch.cuda.is_available():
        pytest.skip("CUDA is available: the pipeline runs its real path")
    run = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_zero1_reduces_gradients_to_owners_and_gathers_parameters_once(tmp_path):
    r = data_parallel(tmp_path, "--zero-stage", "1")
    assert r["zero_settings"]["use_multi_rank_bucket_allreduce"] is False  # derived: DeepSpeed's default is true
    assert r["gradient_reduction"]["minimum"] == PSI / 2
    assert r["gradient_reduction"]["ratio"] <= 1.05
    assert r["gradient_reduction"]["ratio"] == pytest.approx(1.0, abs=1e-5)  # + the gradient norm's 8 bytes
    assert {op["op"] for op in r["ops"] if op["via"] == "deepspeed"} == {"reduce", "all_reduce",
                                                                          "all_gather_into_tensor"}
    assert r["parameter_all_gather"]["counted"] == PSI / 2


@pytest.mark.slow
def test_zero1_with_the_multi_rank_all_reduce_moves_twice_the_minimum(tmp_path):
    r = data_parallel(tmp_path, "--zero-stage", "1", "--zero", "use_multi_rank_bucket_allreduce=true")
    assert r["gradient_reduction"]["ratio"] == pytest.approx(2.0, abs=1e-5)  # what a JSON that asks for it gets


@pytest.mark.slow
def test_zero2_reduces_to_owners_each_micro_batch(tmp_path):
    r = data_parallel(tmp_path, "--zero-stage", "2", "--accumulation", "2")
    assert r["gradient_reduction"]["minimum"] == PSI  # 2 micro-batches x f Psi
    assert r["gradient_reduction"]["ratio"] <= 1.05
    assert r["gradient_reduction"]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert {op["op"] for op in r["ops"] if op["via"] == "deepspeed"} == {"reduce", "all_reduce",
                                                                          "all_gather_into_tensor"}
    assert {op["group"] for op in r["ops"]} == {"data"}  # every rank holds the model: the world is the data group
    assert r["parameter_all_gather"]["counted"] == PSI / 2


@pytest.mark.slow
def test_zero3_keeps_gathered_parameters_within_the_reuse_distance(tmp_path):
    r = data_parallel(tmp_path, "--zero-stage", "3", "--zero", "stage3_param_persistence_threshold=0")
    assert r["model"]["zero3_persistent"] == 0
    assert r["gradient_reduction"]["minimum"] == PSI / 2
    assert r["gradient_reduction"]["ratio"] == pytest.approx(1.0, abs=1e-5)  # partition padding: 8 B
    assert r["parameter_all_gather"]["minimum"] == PSI
    assert r["parameter_all_gather"]["ratio"] == pytest.approx(0.5, abs=1e-5)


@pytest.mark.slow
def test_zero3_preset_settings_keep_parameters_for_the_step(tmp_path):
    # the derived settings alone (vlmo_ds.config.zero_settings): vectors stay whole, matrices are gathered once
    r = data_parallel(tmp_path, "--zero-stage", "3", "--accumulation", "2")
    kept = r["model"]["zero3_persistent"]
    assert r["zero_settings"]["stage3_param_persistence_threshold"] == 512 and 0 < kept < PSI / 4 / 100
    f = 1 / 2
    kept_for_the_step = 2 * f * (PSI - kept * 4) + f * kept * 4  # A f Psi_3 + f Pp B
    assert r["parameter_all_gather"]["counted"] == pytest.approx(kept_for_the_step, abs=16)
    assert r["gradient_reduction"]["ratio"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_zero3_without_reuse_gathers_for_every_pass(tmp_path):
    r = data_parallel(tmp_path, "--zero-stage", "3", "--zero", "stage3_param_persistence_threshold=0",
                      "--zero", "stage3_max_reuse_distance=0", "--zero", "stage3_prefetch_bucket_size=0")
    assert r["gradient_reduction"]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert 1.5 < r["parameter_all_gather"]["ratio"] < r["forward_passes"]["counted"]


def masked_tokens(batch: int) -> int:
    """M of a tiny micro-batch: the MLM head scores every text position (T = 32)."""
    return batch * preset("tiny").max_text_len


# tiny (D 128, L 4, S 3, T 32, I 65), B 2, F 8, fp32: X = 4 x 2 x 97 + 1 x 2 x 97 + 4 x 8 x 97 = 4074 tokens;
# 4 X D 4 + (2 + 8) 32 D 4 = 8,507,392 bytes, + M (D 4 + 12) for the M text positions the MLM head scores
def tiny_tensor_bytes(masked: int) -> int:
    return 8_507_392 + 524 * masked


@pytest.mark.slow
def test_tensor_parallel_all_reduces_equal_the_formula(tmp_path):
    r, text = bench(tmp_path, 2, "--tensor", "2")
    assert r["layout"] | {"backend": None} == {"tensor": 2, "pipeline": 1, "data": 1, "zero_stage": 0, "dtype": "fp32",
                                               "backend": None, "device": "cpu", "cpu_pipeline": False,
                                               "overlap_comm": False}
    row = r["tensor_all_reduce"]
    # per block call 2 forward + 2 backward; blocks below S run the text and image experts as two calls each way
    assert row["calls"] == 4 * 2 * 4 + 2 * 4 + 3 * 6 + 4 + 2 + 1 + 3  # unimodal, VL path, fused, emb., MLM, CE
    assert row["counted"] == row["minimum"] == row["payload"] == tiny_tensor_bytes(masked_tokens(2))
    assert row["ratio"] == 1.0
    assert r["gradient_reduction"]["counted"] == 0  # a data-parallel group of one rank sends nothing
    assert "activation all-reduces" in text and "point-to-point" not in text


@pytest.mark.slow
def test_tensor_by_pipeline_sends_activations_and_shares_the_all_reduces(tmp_path):
    r, text = bench(tmp_path, 4, "--tensor", "2", "--pipeline", "2", "--zero-stage", "1", "--cpu-pipeline")
    assert "CPU test mode" in text and r["layout"]["overlap_comm"] is False
    tensor = r["tensor_all_reduce"]
    assert tensor["counted"] == tensor["minimum"] == tiny_tensor_bytes(masked_tokens(2)) / 2  # mean over 2 stages
    sends = r["pipeline_p2p"]
    # [2, 65 + 32, 128] unimodal and [8, 97, 128] fused, forward and back, 4 shape messages; mean over 2 stages
    assert sends["counted"] == sends["minimum"] == (2 * (2 * 97 * 128 * 4 + 8 * 97 * 128 * 4) + 4 * 24) / 2
    assert {(op["op"], op["calls"]) for op in r["ops"] if op["group"] == "pipeline"} >= {("isend", 4), ("irecv", 4)}
