"""Slurm's compressed host lists and task counts, read without Slurm's tools.

vlmo_ds takes the master address of a Slurm job step from the first host of its node list, on every task, without
talking to the others; `scontrol show hostnames` is missing on many compute nodes (and in containers), so the two
formats are expanded here:

- node lists, as in SLURM_JOB_NODELIST: ``gpu[001-004,010],cpu7`` -> gpu001 gpu002 gpu003 gpu004 gpu010 cpu7. A
  range keeps the zero padding of its lower bound (``[08-11]`` -> 08 09 10 11); several bracket groups in one name
  expand as a product, the leftmost slowest (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2); text after a group is a
  suffix (``node[1-2]-ib`` -> node1-ib node2-ib).
- task counts per node, as in SLURM_TASKS_PER_NODE: ``2(x3),1`` -> 2 2 2 1.
"""

from __future__ import annotations

import itertools
import re

_GROUP = re.compile(r"\[([^\[\]]*)\]")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_COUNT = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets; reject unbalanced or nested brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' at position {i}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"']' without '[' at position {i}")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("'[' without ']'")
    items.append(text[start:])
    return items


def _expand_group(body: str) -> list[str]:
    """'001-003,010' -> ['001', '002', '003', '010']."""
    values = []
    for part in body.split(","):
        match = _RANGE.fullmatch(part)
        if match is None:
            raise ValueError(f"range {part!r} is not N or N-M with digits")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"range {part!r} goes down")
        width = len(low)  # Slurm pads to the width of the lower bound: [08-11] -> 08 09 10 11
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


def expand_nodelist(text: str) -> list[str]:
    """All host names of a compressed Slurm node list, in Slurm's order; ValueError if it cannot be read."""
    hosts = []
    try:
        for item in _split_top_level(text.strip()):
            if not item:
                raise ValueError("empty host name")
            pieces = _GROUP.split(item)  # literal, group, literal, group, ..., literal
            literals, groups = pieces[0::2], [_expand_group(body) for body in pieces[1::2]]
            for choice in itertools.product(*groups):
                hosts.append("".join(lit + val for lit, val in zip(literals, choice)) + literals[-1])
    except ValueError as err:
        raise ValueError(f"cannot read the node list {text!r}: {err}") from err
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """Tasks on each node from Slurm's count list: '2(x3),1' -> [2, 2, 2, 1]; ValueError if it cannot be read."""
    counts = []
    for part in text.strip().split(","):
        match = _COUNT.fullmatch(part)
        if match is None:
            raise ValueError(f"cannot read the task counts {text!r}: {part!r} is not N or N(xK)")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts
