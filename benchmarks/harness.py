"""Measurement helpers shared by the benchmark scripts (transforms.py, trainer.py).

Wall-clock times are noisy on a shared machine, so the scripts run their
variants interleaved: `round_robin` calls every variant once per round and the
median over the rounds is reported, so that load from other processes affects
all variants alike. Next to the times the scripts report what XLA's compiled
`cost_analysis()` and `memory_analysis()` say, which does not depend on the
machine's load.

Example::

  compiled = jax.jit(step).lower(params, state, key).compile()
  times = round_robin({"plain": lambda: timed(compiled, params, state, key)[0]}, rounds=3)
  print_table(["variant", "ms/step"], [["plain", f"{1e3 * median(times['plain']):.0f}"]])
"""

import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import summaries


def synthetic_batch(
    num_examples: int, input_length: int, target_length: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random full-length examples, the features of seqio's `EncDecFeatureConverter`.

    Token ids are drawn from [1, vocab_size) (0 is padding), so no example is padded
    and every loss weight is 1.

    Returns:
      int32 arrays: `encoder_input_tokens` [num_examples, input_length] and
      `decoder_input_tokens` (targets shifted right), `decoder_target_tokens`,
      `decoder_loss_weights` [num_examples, target_length].
    """
    rng = np.random.default_rng(seed)
    targets = rng.integers(1, vocab_size, (num_examples, target_length), dtype=np.int32)
    return {
        "encoder_input_tokens": rng.integers(
            1, vocab_size, (num_examples, input_length), dtype=np.int32
        ),
        "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones_like(targets),
    }


def timed(fn: Callable, *args) -> tuple[float, Any]:
    """Calls `fn(*args)` and waits for its arrays.

    Returns:
      (wall-clock seconds, the result).
    """
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, result


def round_robin(runs: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Runs every variant once per round, in turn, after one warm-up call each.

    Args:
      runs: {name: run}; `run()` does the work and returns the seconds it took.
      rounds: the timed rounds.

    Returns:
      {name: [seconds of round 1, ..., of round `rounds`]}.
    """
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            times[name].append(run())
        print(f"round {r + 1}/{rounds}", flush=True)
    return times


class Cost(NamedTuple):
    """What XLA's `cost_analysis()` says one call of a compiled step costs.

    Attributes:
      flops: floating-point operations.
      bytes_accessed: bytes read and written by its operations (a memory-bound
        pass over the parameters costs time but few FLOPs; this shows it).
    """

    flops: float
    bytes_accessed: float


def compiled_cost(compiled: jax.stages.Compiled) -> Cost:
    """FLOPs and bytes accessed of one call (per device when sharded)."""
    analysis = compiled.cost_analysis()
    return Cost(float(analysis["flops"]), float(analysis["bytes accessed"]))


def peak_bytes(compiled: jax.stages.Compiled) -> int:
    """Device memory of one call by XLA's `memory_analysis()`.

    Arguments + outputs − the outputs aliased to donated arguments + temporaries:
    what is live at once, per device when sharded.
    """
    memory = compiled.memory_analysis()
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


def refresh_cost(mask, params, batch, loss_fn, mask_state) -> Cost:
    """The cost of one Fisher-mask refresh on its own.

    XLA's cost analysis counts the costlier branch of a `cond`, so a SAM step
    with a `sam_jax.fisher_mask` is counted as if it refreshed the mask; subtract
    this to get an ordinary step (see `amortized`).

    Args:
      mask: the `sam_jax.fisher_mask(...)` of the step.
      params: the parameters.
      batch: the step's batch.
      loss_fn: the step's per-example loss function.
      mask_state: the `FisherMaskState` (`SamState.mask_state`).
    """
    refresh = jax.jit(
        lambda p, s: mask.update(s, jnp.int32(0), p, loss_fn, batch, jax.random.key(0))
    )
    return compiled_cost(refresh.lower(params, mask_state).compile())


def amortized(ordinary: float, refresh: float, interval: int) -> float:
    """The mean cost per step when one step in `interval` costs `refresh`, the others `ordinary`."""
    return ((interval - 1) * ordinary + refresh) / interval


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> None:
    """Prints formatted cells as a Markdown table or as aligned plain text."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        print("\n".join(lines), flush=True)
    else:
        print(summaries.format_table(header, rows), flush=True)
