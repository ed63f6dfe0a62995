"""Lines of text from text files and from the `.txt` members of WebDataset shards: the corpus a tokenizer trains on."""
from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from webdataset.shardlists import expand_urls


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Text files, tar shards, folders of shards and brace patterns -> existing files, in the order given."""
    files: list[Path] = []
    for spec in inputs:
        for item in expand_urls(spec):
            path = Path(item)
            if path.is_dir():
                shards = sorted(path.glob("*.tar"))
                if not shards:
                    raise FileNotFoundError(f"folder {path} holds no *.tar shards; pass text files or shards instead")
                files.extend(shards)
            elif path.is_file():
                files.append(path)
            else:
                raise FileNotFoundError(f"input {path} does not exist (from {spec!r}); check the path or pattern")
    return files


def _tar_lines(path: Path) -> Iterator[str]:
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".txt"):
                data = tar.extractfile(member)
                if data is not None:
                    yield from data.read().decode("utf-8", errors="replace").splitlines()


def iter_lines(files: Iterable[Path]) -> Iterator[str]:
    """Lines of text files and of the ``.txt`` members of tar shards (gzipped tars too)."""
    for path in files:
        if tarfile.is_tarfile(path):
            yield from _tar_lines(path)
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in f)
