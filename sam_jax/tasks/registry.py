"""Idempotent registration in seqio's global Task and Mixture registries.

seqio's registries raise on duplicate names, so importing a task module twice
(or `importlib.reload`) would fail; `add_task` and `add_mixture` replace an
existing definition instead. The registries are global: tests `remove` what
they register.

Example:
  >>> add_task("my_task", source=source, output_features=features, preprocessors=[...])
  >>> add_task("my_task", source=other_source, output_features=features)  # replaces it
  >>> add_mixture("my_mixture", ["my_task"], default_rate=1.0)
  >>> remove(["my_mixture", "my_task"])
"""

from __future__ import annotations

from collections.abc import Iterable

import seqio


def add_task(name: str, **task_kwargs) -> seqio.Task:
    """`seqio.TaskRegistry.add` that replaces an existing task of that name.

    Mixtures hold Task objects, so re-add the mixtures that use a replaced task
    too.
    """
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, **task_kwargs)


def add_mixture(name: str, tasks, **mixture_kwargs) -> seqio.Mixture:
    """`seqio.MixtureRegistry.add` that replaces an existing mixture."""
    seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, tasks, **mixture_kwargs)


def remove(names: Iterable[str]) -> None:
    """Removes tasks/mixtures from seqio's (global) registries, if present."""
    for name in names:
        seqio.MixtureRegistry.remove(name)
        seqio.TaskRegistry.remove(name)
