"""The output folder of tools/make_shards.py: a folder that already holds data is refused, and ``--overwrite`` removes
only what an earlier make_shards run there wrote.

Shard folders sit side by side on shared file systems, and a converter pointed at the wrong one must not destroy
another data set. So a run starts only in a missing or empty folder, unless ``--overwrite``; then the files named in
the folder's conversion_report.json ``files`` list (report.py: every file that run wrote) are removed, and only those
that lie inside the folder and carry a name the tool writes (shard-NNNNNN.tar, sizes.json, answer_vocab.json,
conversion_report.json). Anything else stays. A file with such a name in the folder or one of its subfolders (where
the splits go) that the report does not list belongs to someone else: the run is refused before anything is removed,
as the new shards would be mixed with it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from vlmo_ds.data.formats.images import is_inside
from vlmo_ds.data.formats.report import REPORT_FILE

TOOL_FILE = re.compile(r"shard-\d{6}\.tar(\.tmp)?|sizes\.json|answer_vocab\.json|conversion_report\.json")


def _listed_files(out: Path) -> set[Path]:
    """The report in ``out`` and the files it says its run wrote, kept to those inside ``out`` with a tool name."""
    try:
        listed = json.loads((out / REPORT_FILE).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):  # no report, not JSON, not an object: nothing is known to be ours
        return set()
    names = [name for name in listed if isinstance(name, str)] if isinstance(listed, list) else []
    paths = {Path(os.path.normpath(out / name)) for name in [*names, REPORT_FILE]}
    return {p for p in paths if is_inside(out, p) and TOOL_FILE.fullmatch(p.name) and p.is_file()}


def _tool_named(out: Path) -> list[Path]:
    """Files with a name the tool writes, in ``out`` or one of its subfolders (where the splits go)."""
    found = [p for p in out.iterdir() if p.is_file() and TOOL_FILE.fullmatch(p.name)]
    for folder in (p for p in out.iterdir() if p.is_dir()):
        found += [p for p in folder.iterdir() if p.is_file() and TOOL_FILE.fullmatch(p.name)]
    return sorted(found)


def prepare_out(out: Path, overwrite: bool) -> list[Path]:
    """Make ``out`` ready for a conversion and return the files removed (see the module docstring).

    FileExistsError (one line: what is there, what to do) for a folder holding data without ``overwrite``, or
    holding files of the tool's names that no earlier run there lists as its own; nothing is removed then.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    held = next((p for p in out.rglob("*") if not p.is_dir()), None) if out.is_dir() else None
    if held is None:
        return []
    if not overwrite:
        raise FileExistsError(f"--out {out} already holds data ({held}); give a new or empty folder, or add "
                              f"--overwrite to replace what an earlier make_shards run wrote there (the files its "
                              f"{REPORT_FILE} lists; nothing else is touched)")
    ours = _listed_files(out)
    foreign = [p for p in _tool_named(out) if Path(os.path.normpath(p)) not in ours]
    if foreign:
        raise FileExistsError(f"--out {out} holds {foreign[0]} ({len(foreign)} files of make_shards' names) that no "
                              "earlier make_shards run there lists as its own: it may be another data set; move it, "
                              "or give this data set a folder of its own")
    removed = sorted(ours, key=lambda p: (p.name == REPORT_FILE, str(p)))  # the report last: a retry still knows
    for path in removed:
        path.unlink()
    return removed
