"""Writing checkpoint files safely: every file under a temporary name beside its final one, then renamed (a reader
never sees half a file), and never outside the output folder the user named.

Names that come from a checkpoint's metadata (a stage name, a `latest` pointer, a tag) are single path components:
`check_name` refuses empty names, "." and "..", separators and absolute paths, and `OutDir.path` also refuses any
path that resolves outside its root (a symbolic link pointing away included).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlmo_ds.ckpt.errors import CheckpointError


def check_name(name: str, source: str) -> str:
    """`name` if it is one plain path component; CheckpointError naming `source` (where the name came from) if not."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise CheckpointError(f"refusing the name {name!r} from {source}: it is not one plain file or folder name "
                              "and could write outside the output folder; fix or remove that entry")
    return name


class OutDir:
    """An output folder (created on first use) whose files are written atomically and stay inside it."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"output {root} exists and is not a folder; name a new or existing folder")
        self.root = root

    def path(self, *names: str, source: str = "the output layout") -> Path:
        """root / names..., each name one checked component; refuses anything resolving outside root."""
        path = self.root
        for name in names:
            path = path / check_name(name, source)
        base = self.root.resolve()
        if not path.resolve().is_relative_to(base):
            raise CheckpointError(f"refusing to write {path}: it resolves outside the output folder {base} "
                                  "(a symbolic link?); choose another output folder")
        return path

    def _commit(self, final: Path, write) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            write(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def write_text(self, *names: str, text: str) -> Path:
        return self._commit(self.path(*names), lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def write_json(self, *names: str, obj: Any) -> Path:
        return self.write_text(*names, text=json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")

    def save_safetensors(self, *names: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
        return self._commit(self.path(*names), lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))

    def save_torch(self, *names: str, obj: Any) -> Path:
        return self._commit(self.path(*names), lambda tmp: torch.save(obj, tmp))

    def copy_file(self, source: Path, *names: str) -> Path:
        return self._commit(self.path(*names), lambda tmp: shutil.copyfile(source, tmp))

    def link_or_copy(self, source: Path, *names: str) -> Path:
        """A hard link to `source` where the file system allows one (large weights cost no space), else a copy."""
        def write(tmp: Path) -> None:
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)

        return self._commit(self.path(*names), write)
