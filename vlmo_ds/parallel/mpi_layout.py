"""Where each process of an mpirun job sits, from the host names of all ranks.

mpirun exports each process's rank, but not the node index, and not where torch.distributed's rendezvous should
listen. One MPI allgather of (host name, port offer) through mpi4py answers all of it the same way on every rank.
mpi4py is imported here only, when the MPI path needs it, so vlmo_ds runs without it under other launchers.
"""

from __future__ import annotations

import socket


def layout_from_hosts(rank: int, hosts: list[str]) -> tuple[int, int, int, str | None]:
    """(local rank, processes on this node, node index, host of rank 0) from every rank's host name.

    Nodes are numbered in the order of their lowest rank; any placement works (by slot or round-robin by node).
    The host of rank 0 is None when all ranks share one host (the caller then uses the loopback address, which
    needs no name resolution).
    """
    mine = hosts[rank]
    nodes = list(dict.fromkeys(hosts))
    master = hosts[0] if len(nodes) > 1 else None
    return hosts[:rank].count(mine), hosts.count(mine), nodes.index(mine), master


def gather_layout(rank: int, world: int, port_offer: int, fix: str) -> tuple[int, int, int, str | None, int]:
    """layout_from_hosts over MPI_COMM_WORLD, plus rank 0's port_offer; fix says what to do without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(f"mpirun started this process but mpi4py cannot be imported ({err}): {fix}") from err
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (rank, world):
        raise ValueError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()} but the environment says {rank} of "
                         f"{world}: unset the stale rank variables (RANK, OMPI_COMM_WORLD_*, PMI_*)")
    gathered = comm.allgather((socket.gethostname(), port_offer))
    local_rank, local_world, node_rank, master = layout_from_hosts(rank, [host for host, _ in gathered])
    return local_rank, local_world, node_rank, master, gathered[0][1]
