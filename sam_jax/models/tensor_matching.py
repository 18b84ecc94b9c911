"""Strict checkpoint loading: every tensor used, none missing, each of the right shape.

Shared by the checkpoint readers of `sam_jax.models.bert` and
`sam_jax.models.t5_checkpoints`: a tensor the model does not use, a missing one
or a wrong shape is a one-line ValueError that names it.
"""

from collections.abc import Mapping
from collections.abc import Set
from typing import Any

Path = tuple[str, ...]


def name_sample(names: list[str], limit: int = 8) -> str:
    """The first `limit` names, and how many more there are."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def check_names(found: Set[str], wanted: Set[str], where: str, hint: str = "") -> None:
    """Raises a ValueError naming the unused and the missing tensors, if any.

    Args:
      found: the tensor names of the checkpoint.
      wanted: the names the model needs.
      where: the checkpoint (path) and model, for the message.
      hint: what to do, appended to the message.
    """
    unused, missing = sorted(found - wanted), sorted(wanted - found)
    if unused or missing:
        raise ValueError(
            f"{where}: tensors do not match the model: unused {name_sample(unused)}, "
            f"missing {name_sample(missing)}{hint}."
        )


def check_shapes(
    found: Mapping[str, tuple[int, ...]], wanted: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Raises a ValueError naming the first tensor whose shape differs, with both shapes."""
    for name, want in wanted.items():
        if tuple(found[name]) != tuple(want):
            raise ValueError(
                f"{where}: tensor {name!r} has shape {tuple(found[name])}; the model needs "
                f"{tuple(want)}."
            )


def set_path(tree: dict, path: Path, value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: Path) -> Any:
    """tree[path[0]][path[1]]..."""
    for key in path:
        tree = tree[key]
    return tree
