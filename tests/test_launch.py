"""Launcher discovery from hand-written environments: Slurm strings, each launcher, precedence, errors, start-up."""

from __future__ import annotations

import logging
import os

import pytest
import torch.distributed as dist

from vlmo_ds.parallel.env_readers import DistEnv
from vlmo_ds.parallel.hostlist import expand_nodelist, expand_tasks_per_node
from vlmo_ds.parallel.launch import describe, discover, init_distributed
from vlmo_ds.parallel.mpi_layout import layout_from_hosts

MASTER = {"MASTER_ADDR": "node0", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("text, hosts", [
    ("cpu7", ["cpu7"]),
    ("gpu[001-004,010],cpu7", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "cpu7"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),  # no padding: width of the lower bound
    ("a[08-11]", ["a08", "a09", "a10", "a11"]),
    ("a[098-101]", ["a098", "a099", "a100", "a101"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),  # suffix after the range
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # two groups: product, leftmost slowest
    ("gpu[1,3],cpu[01-02],login-1", ["gpu1", "gpu3", "cpu01", "cpu02", "login-1"]),
    (" x[5] ", ["x5"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["", "gpu[1-", "gpu1]", "gpu[]", "a,,b", "g[3-1]", "g[a-b]", "g[1[2]]", "g[1:4]"])
def test_expand_nodelist_rejects(text):
    with pytest.raises(ValueError, match="cannot read the node list"):
        expand_nodelist(text)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    assert expand_tasks_per_node("1,8(x2)") == [1, 8, 8]
    for bad in ("", "2(x)", "x2", "2(3)"):
        with pytest.raises(ValueError, match="cannot read the task counts"):
            expand_tasks_per_node(bad)


def test_single_process():
    env = discover({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (0, 1, 0, 1, 0)
    assert (env.master_addr, env.launcher) == ("127.0.0.1", "single")
    assert 1 <= env.master_port <= 65535
    assert discover(MASTER) == DistEnv(0, 1, 0, 1, 0, "node0", 29500, "single")


def test_torchrun():
    environ = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
               "TORCHELASTIC_RUN_ID": "none", **MASTER}
    assert discover(environ) == DistEnv(5, 8, 1, 4, 1, "node0", 29500, "torchrun")


def test_deepspeed_launcher():
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "CROSS_RANK": "1", "CROSS_SIZE": "2",
               "LOCAL_SIZE": "2", **MASTER}
    assert discover(environ) == DistEnv(3, 4, 1, 2, 1, "node0", 29500, "deepspeed")


def test_plain_rank_variables():
    assert discover({"RANK": "1", "WORLD_SIZE": "2", **MASTER}) == DistEnv(1, 2, 1, 2, 0, "node0", 29500, "torchrun")
    # One process needs no rendezvous address.
    assert discover({"RANK": "0", "WORLD_SIZE": "1"}).master_addr == "127.0.0.1"
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE is not set"):
        discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", **MASTER})


SLURM = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
         "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_JOB_NODELIST": "gpu[001-004,010],cpu7", "SLURM_JOB_ID": "123456"}


def test_slurm():
    # port: 10000 + 123456 % 20000
    assert discover(SLURM) == DistEnv(5, 7, 1, 2, 2, "gpu001", 13456, "slurm")
    last = {**SLURM, "SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "3"}
    assert discover(last) == DistEnv(6, 7, 0, 1, 3, "gpu001", 13456, "slurm")
    per_node = {**SLURM, "SLURM_TASKS_PER_NODE": "", "SLURM_NTASKS_PER_NODE": "2"}
    assert discover(per_node).local_world_size == 2


def test_slurm_prefers_step_values_and_explicit_master():
    step = {**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "cpu[07-08]"}
    assert discover(step) == DistEnv(0, 2, 0, 2, 0, "cpu07", 13456, "slurm")
    # An explicit master wins, and the node list is then not even read.
    explicit = {**SLURM, "SLURM_JOB_NODELIST": "gpu[1-", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "4242"}
    assert (discover(explicit).master_addr, discover(explicit).master_port) == ("10.0.0.9", 4242)


def test_slurm_errors():
    with pytest.raises(ValueError, match=r"SLURM_JOB_NODELIST.*set MASTER_ADDR"):
        discover({**SLURM, "SLURM_JOB_NODELIST": "gpu[001-"})
    no_list = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    with pytest.raises(ValueError, match="MASTER_ADDR is not set and the world size is 7"):
        discover(no_list)
    with pytest.raises(ValueError, match=r"adds up to 8 tasks, not SLURM_NTASKS=7"):
        discover({**SLURM, "SLURM_TASKS_PER_NODE": "2(x4)"})
    with pytest.raises(ValueError, match=r"SLURM_LOCALID=2 must lie in \[0, SLURM_TASKS_PER_NODE=2\)"):
        discover({**SLURM, "SLURM_LOCALID": "2"})


def test_precedence(caplog):
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0",
                **MASTER}
    # torchrun started by srun: SLURM_PROCID counts srun tasks, RANK counts training processes.
    assert discover({**SLURM, **torchrun}).launcher == "torchrun"
    # mpirun inside an allocation: every rank inherits the batch script's SLURM_PROCID=0.
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", **MASTER}
    assert discover({**SLURM, "SLURM_PROCID": "0", **ompi}) == DistEnv(3, 4, 1, 2, 1, "node0", 29500, "mpi")
    # srun --mpi=pmi2 sets PMI_RANK equal to SLURM_PROCID: srun is the launcher.
    assert discover({**SLURM, "PMI_RANK": "5", "PMI_SIZE": "7"}).launcher == "slurm"
    assert discover({"PMI_RANK": "0", "PMI_SIZE": "1"}).launcher == "mpi"
    # The batch script itself (no step): one process, with a warning.
    batch = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}
    with caplog.at_level(logging.WARNING, logger="vlmo_ds.parallel.launch"):
        assert discover({**batch, "SLURM_PROCID": "0"}).launcher == "single"
    assert "not an srun task" in caplog.text


def test_mpi_layout_from_hosts():
    by_slot, round_robin = ["a", "a", "b", "b"], ["a", "b", "a", "b"]
    assert layout_from_hosts(2, by_slot) == (0, 2, 1, "a")
    assert layout_from_hosts(3, round_robin) == (1, 2, 1, "a")
    assert layout_from_hosts(1, ["h", "h"]) == (1, 2, 0, None)  # one host: the caller uses the loopback address
    assert layout_from_hosts(2, ["a", "b", "b"]) == (1, 2, 1, "a")


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "4", "WORLD_SIZE": "4", **MASTER}, r"RANK=4 must lie in \[0, WORLD_SIZE=4\)"),
    ({"RANK": "one", "WORLD_SIZE": "4", **MASTER}, "RANK='one' is not an integer"),
    ({"RANK": "0", **MASTER}, "WORLD_SIZE is not set although RANK is"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not set and the world size is 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT is not set and the world size is 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", **MASTER},
     r"LOCAL_RANK=3 must lie in \[0, LOCAL_WORLD_SIZE=2\)"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE is not set"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE=0: a count of processes is at least"),
    ({**SLURM, "SLURM_NTASKS": "0"}, "SLURM_NTASKS=0: a count"),
])
def test_errors_name_the_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        discover(environ)


def test_describe():
    env = DistEnv(3, 8, 1, 4, 1, "gpu001", 12345, "slurm")
    assert describe(env) == "rank 3/8 (node 1, local 1/4) via slurm, master gpu001:12345"


def test_init_distributed_single_process(monkeypatch):
    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    for name in exported:
        monkeypatch.setenv(name, "")  # records the original value, so the test leaves os.environ as it found it
    if dist.is_initialized():
        pytest.skip("another test left torch.distributed running")
    env = discover({})
    init_distributed(env, backend="gloo", use_deepspeed=False)
    try:
        assert (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (0, 1, "gloo")
        assert os.environ["MASTER_PORT"] == str(env.master_port) and os.environ["RANK"] == "0"
        init_distributed(DistEnv(0, 1, 0, 1, 0, "elsewhere", 1, "single"))  # already running: nothing happens
        again = discover()
        assert (again.rank, again.world_size, again.master_port) == (0, 1, env.master_port)
    finally:
        dist.destroy_process_group()
