"""Recipe YAML and command-line overrides as a plain tree of dicts and lists, before any typing.

Two YAML fixes over PyYAML's safe loader: `1e-4` is a float (YAML 1.1 reads it as a string, a classic trap for
learning rates), and a key written twice in one mapping is an error rather than a silent "last one wins".
Overrides are `dotted.key=value` with the value read as YAML: `optim.lr=1e-4`, `stages.0.steps=50`,
`stages.image_text.steps=50` (a stage by name), `optim.betas=[0.9,0.95]`, `eval.retrieval=null`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from vlmo_ds.config.errors import ConfigError

_FLOAT = re.compile(
    r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[0-9][0-9_]*[eE][-+]?[0-9]+
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$""",
    re.X,
)
_KEY = re.compile(r"^[A-Za-z0-9_]+(?:\.[A-Za-z0-9_\-]+)*$")


class _Loader(yaml.SafeLoader):
    """Safe loader with exponent-only floats and duplicate-key detection."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{key}: written twice in one mapping (line {line}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python value; `where` names the source in the one-line error."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe file's top-level mapping."""
    tree = parse_yaml(path.read_text(encoding="utf-8"), f"recipe {path}")
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {path}: the top level must be a mapping of keys (run_dir, model, stages, ...)")
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-4' -> ('optim.lr', 0.0001)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected key=value, e.g. optim.lr=1e-4 or stages.0.steps=50")
    if not _KEY.match(key):
        raise ConfigError(f"override '{text}': '{key}' is not a dotted key path such as train.micro_batch")
    return key, parse_yaml(value, f"override {key}")


def _child(node: Any, part: str, done: str) -> tuple[Any, Any]:
    """(container key or index, child) of `node` for one path part; stages may be picked by index or name."""
    if isinstance(node, list):
        if part.isdigit():
            index = int(part)
            if index >= len(node):
                span = "index 0" if len(node) == 1 else f"indices 0-{len(node) - 1}"
                raise ConfigError(f"{done}.{part}: {done} has {len(node)} entr{'y' if len(node) == 1 else 'ies'} "
                                  f"({span}); overrides change entries, they cannot add one")
            return index, node[index]
        names = [item.get("name") for item in node if isinstance(item, dict)]
        if part in names:
            index = names.index(part)
            return index, node[index]
        raise ConfigError(f"{done}.{part}: no entry of {done} has that index or name "
                          f"(names: {', '.join(map(str, names)) or 'none'})")
    return part, node.get(part)


def apply_override(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (dotted) to `value` in the raw recipe tree, creating missing mappings on the way."""
    parts = key.split(".")
    node: Any = tree
    done = ""
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{done}: is a single value ({node!r}), so '{key}' cannot set a key inside it")
        slot, child = _child(node, part, done)
        if last:
            node[slot] = value
            return
        if child is None and isinstance(node, dict):
            child = node[slot] = {}
        node = child
        done = f"{done}.{part}" if done else part
