r"""Throughput of the T5.1.1 train step of `sam_jax.train`, plain and with each SAM variant.

Every variant's step is the one `python -m sam_jax.train` runs: the script
parses gin/runs/finetune.gin, gin/models/t5_1_1/<size>.gin and the variant's
gin/sam/<variant>.gin (none for `plain`, the run's optimizer alone: Adafactor),
reads the arguments gin binds to `sam_jax.train.train` and passes them to
`sam_jax.train.setup_training`, which builds the jitted, sharded step with the
training state donated (every variant starts from the parameters of plain's
`init_state`). Batches are synthetic: `--batch_size` examples of
`--input_length` input and `--target_length` target tokens (the run's
BATCH_SIZE and TASK_FEATURE_LENGTHS), random token ids, no padding; nothing is
downloaded.

For every variant, relative to plain:

* tokens/s (target tokens, and input + target tokens), examples/s and ms/step:
  the median over `--rounds` interleaved rounds (plain, sam, ..., plain, sam,
  ...) of `--steps` consecutive steps, so that machine noise affects them alike;
* time ×: ms/step over plain's;
* FLOPs ×: XLA's `cost_analysis()` of the compiled step (machine-independent);
* peak mem ×: XLA's `memory_analysis()`: arguments + outputs − donated (aliased)
  outputs + temporaries, over plain's;
* compile s: the wall-clock time to lower and compile the step.

FSAM's mask refresh (every MASK_INTERVAL = 100 steps) is amortised like in
benchmarks/transforms.py: ((interval − 1)·ordinary + refresh) / interval, in
time (a refresh step is timed in every round) and in FLOPs.

Usage::

  python benchmarks/trainer.py [--size=tiny] [--batch_size=32] [--input_length=64]
      [--target_length=16] [--rounds=5] [--steps=3] [--variants=plain,sam,...]
      [--markdown] [--gin.NAME=VALUE ...]

`--gin.NAME=VALUE` (or `--gin_bindings`) and `--gin_file` apply to every variant,
as for `sam_jax.train`, e.g. `--gin.ACTIVATION_DTYPE="'bfloat16'"` or
`--gin.RHO=0.15`.
"""

import dataclasses
import inspect
import statistics
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from harness import amortized
from harness import compiled_cost
from harness import peak_bytes
from harness import print_table
from harness import refresh_cost
from harness import round_robin
from harness import synthetic_batch

import sam_jax
from sam_jax import config as run_config
from sam_jax import train as train_lib
from sam_jax import trainer as trainer_lib

# gin file (under gin/) and table label of every variant; None: the optimizer alone.
VARIANTS = {
    "plain": (None, "plain"),
    "sam": ("sam/sam.gin", "SAM"),
    "sam_quarter": ("sam/sam_quarter.gin", "SAM"),
    "delta_sam": ("sam/delta_sam.gin", "δ-SAM"),
    "delta_sam_draft": ("sam/delta_sam_draft.gin", "δ-SAM draft"),
    "fsam": ("sam/fsam.gin", "FSAM"),
    "asam": ("sam/asam.gin", "ASAM"),
}
RUN_GIN = "runs/finetune.gin"
SIZES = ("tiny", "small", "base", "large", "xl")
HEADER = (
    "variant",
    "target tokens/s",
    "tokens/s",
    "examples/s",
    "ms/step",
    "time ×",
    "FLOPs ×",
    "peak mem ×",
    "compile s",
)

_SIZE = flags.DEFINE_enum("size", "tiny", SIZES, "T5.1.1 size: gin/models/t5_1_1/<size>.gin.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Examples per step (BATCH_SIZE).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds over all variants.")
_INPUT_LENGTH = flags.DEFINE_integer("input_length", 64, "Input tokens per example.")
_TARGET_LENGTH = flags.DEFINE_integer("target_length", 16, "Target tokens per example.")
_STEPS = flags.DEFINE_integer("steps", 3, "Consecutive steps per variant and round.")
_VARIANTS = flags.DEFINE_list(
    "variants", list(VARIANTS), f"Variants to measure (plain is always measured): {list(VARIANTS)}."
)
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the table as Markdown.")


@dataclasses.dataclass
class Variant:
    """One compiled train step, its state (donated at every step) and its measurements."""

    label: str
    step: jax.stages.Compiled
    state: object
    batch: dict
    key: jax.Array
    flops: float
    peak_bytes: int
    compile_seconds: float
    reset_count: Callable | None = None  # FSAM: `reset_count(state, count)`
    mask_interval: int = 0
    refresh_flops: float = 0.0
    times: list = dataclasses.field(default_factory=list)
    refresh_times: list = dataclasses.field(default_factory=list)

    def run(self, steps: int, count: int | None = None) -> float:
        """Seconds of `steps` consecutive steps (FSAM: from SAM step count `count`)."""
        if count is not None:
            self.state = self.reset_count(self.state, count)
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch, self.key)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


def bound_or_default(fn: Callable, name: str):
    """The value gin binds to argument `name` of `fn`, else `fn`'s default."""
    bindings = gin.get_bindings(fn)
    return bindings[name] if name in bindings else inspect.signature(fn).parameters[name].default


def parse_variant_gin(
    variant: str,
    size: str,
    batch_size: int,
    lengths: Mapping[str, int],
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
) -> None:
    """Parses the gin files of a `sam_jax.train` run of `variant` (no task, no model dir)."""
    sam_file = VARIANTS[variant][0]
    files = [RUN_GIN, f"models/t5_1_1/{size}.gin", *([sam_file] if sam_file else []), *gin_files]
    bindings = [
        "MODEL_DIR = 'unused'",
        "MIXTURE_OR_TASK_NAME = 'synthetic'",
        "TRAIN_STEPS = 0",
        *gin_bindings,
        f"BATCH_SIZE = {batch_size}",
        f"TASK_FEATURE_LENGTHS = {dict(lengths)!r}",
    ]
    run_config.parse_gin(files, bindings)


def label_of(variant: str, sam) -> str:
    """The variant's table label, with its ascent fraction, from the parsed gin config."""
    label = VARIANTS[variant][1]
    if sam is None:
        return label
    fraction = bound_or_default(sam_jax.sam, "ascent_fraction")
    label = f"{label} f={fraction:g}"
    return f"{label} (amortised)" if bound_or_default(sam_jax.sam, "mask") else label


def initial_state(setup: train_lib.TrainSetup, params=None) -> trainer_lib.TrainState:
    """The run's fresh `TrainState`: `setup.init_state()`, or the same around a copy of `params`.

    Every variant has the same model and seed, so the same initial parameters;
    building the other variants' states around plain's parameters (the optimizer
    state from `optimizer.init`, as `Trainer.init_state` does) spares compiling
    each variant's init, which costs about half as much as compiling its step.
    """
    if params is None:
        return setup.init_state()
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # each state is donated
    state = trainer_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=setup.trainer.optimizer.init(params),
    )
    return jax.device_put(state, setup.state_shardings)


def build_variant(variant: str, batch_size: int, steps: int, params=None) -> tuple[Variant, dict]:
    """Compiles the train step of the parsed gin config, as `sam_jax.train.train` builds it.

    Args:
      variant: a key of `VARIANTS`.
      batch_size: global examples per step.
      steps: steps per timed run (FSAM: fewer than the mask interval).
      params: initial parameters (see `initial_state`), or None to initialise them.

    Returns:
      The `Variant` and `train`'s arguments.
    """
    arguments = {
        name: bound_or_default(train_lib.train, name)
        for name in inspect.signature(train_lib.train).parameters
    }
    setup = train_lib.setup_training(
        **{name: arguments[name] for name in inspect.signature(train_lib.setup_training).parameters}
    )
    lengths = arguments["sequence_length"]
    local_batch = synthetic_batch(
        setup.partitioner.local_batch_size(batch_size),
        lengths["inputs"],
        lengths["targets"],
        setup.trainer.model.config.vocab_size,
        seed=jax.process_index(),
    )
    batch = setup.partitioner.global_batch(local_batch)
    state = initial_state(setup, params)
    start = time.perf_counter()
    compiled = setup.train_step.lower(state, batch, setup.dropout_key).compile()
    compile_seconds = time.perf_counter() - start
    result = Variant(
        label=label_of(variant, arguments["sam"]),
        step=compiled,
        state=state,
        batch=batch,
        key=setup.dropout_key,
        flops=compiled_cost(compiled).flops,
        peak_bytes=peak_bytes(compiled),
        compile_seconds=compile_seconds,
    )
    mask = bound_or_default(sam_jax.sam, "mask") if arguments["sam"] is not None else None
    if mask is not None:
        result.mask_interval = bound_or_default(sam_jax.fisher_mask, "interval")
        if steps >= result.mask_interval:
            raise app.UsageError(
                f"--steps={steps} would refresh the Fisher mask inside the ordinary steps: use "
                f"fewer than its interval ({result.mask_interval})."
            )
        replicated = setup.partitioner.replicated()

        def reset_count(state, count):
            count = jax.device_put(np.int32(count), replicated)
            return state._replace(opt_state=state.opt_state._replace(count=count))

        result.reset_count = reset_count
        with setup.partitioner.context():
            result.refresh_flops = refresh_cost(
                mask,
                state.params,
                batch,
                setup.trainer.loss_fn,
                state.opt_state.mask_state,
            ).flops
    return result, arguments


def measure(variants: dict[str, Variant], rounds: int, steps: int) -> None:
    """Interleaved rounds; FSAM runs its ordinary steps from count 1 and one refresh step."""
    runs = {}
    for name, variant in variants.items():
        if variant.reset_count is None:
            runs[name] = lambda v=variant: v.run(steps)
        else:
            runs[name] = lambda v=variant: v.run(steps, count=1)
            runs[f"{name} (refresh)"] = lambda v=variant: v.run(1, count=0)
    times = round_robin(runs, rounds)
    for name, variant in variants.items():
        variant.times = [seconds / steps for seconds in times[name]]
        variant.refresh_times = times.get(f"{name} (refresh)", [])


def per_step(variant: Variant) -> tuple[float, float]:
    """(median seconds, FLOPs) of one step; FSAM's mask refresh amortised."""
    seconds, flops = statistics.median(variant.times), variant.flops
    if variant.reset_count is not None:
        interval = variant.mask_interval
        seconds = amortized(seconds, statistics.median(variant.refresh_times), interval)
        flops = amortized(flops - variant.refresh_flops, flops, interval)
    return seconds, flops


def report_rows(variants: dict[str, Variant], batch_size: int, lengths) -> list[tuple]:
    """The table's rows, one per variant, plain first.

    Returns:
      (label, target tokens/s, tokens/s, examples/s, ms/step, time ×, FLOPs ×,
      peak mem ×, compile s) tuples; the ratios are relative to plain.
    """
    plain_seconds, plain_flops = per_step(variants["plain"])
    plain_bytes = variants["plain"].peak_bytes
    rows = []
    for variant in variants.values():
        seconds, flops = per_step(variant)
        rows.append(
            (
                variant.label,
                batch_size * lengths["targets"] / seconds,
                batch_size * (lengths["inputs"] + lengths["targets"]) / seconds,
                batch_size / seconds,
                1e3 * seconds,
                seconds / plain_seconds,
                flops / plain_flops,
                variant.peak_bytes / plain_bytes,
                variant.compile_seconds,
            )
        )
    return rows


def format_rows(rows: Sequence[tuple]) -> list[tuple[str, ...]]:
    """The cells of `report_rows`' rows, as strings."""
    formats = ("{}", "{:.0f}", "{:.0f}", "{:.1f}", "{:.1f}", "{:.2f}", "{:.2f}", "{:.2f}", "{:.1f}")
    return [tuple(f.format(value) for f, value in zip(formats, row)) for row in rows]


def benchmark(
    size: str,
    batch_size: int,
    lengths: Mapping[str, int],
    rounds: int,
    steps: int,
    variants: Sequence[str],
    gin_files: Sequence[str] = (),
    gin_bindings: Sequence[str] = (),
) -> list[tuple]:
    """Builds, compiles and times the train step of every variant; prints progress.

    Returns:
      The table's rows (see `report_rows`), plain first.
    """
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise app.UsageError(f"Unknown variants {unknown}; choose from {list(VARIANTS)}.")
    names = ["plain", *(name for name in dict.fromkeys(variants) if name != "plain")]
    built, arguments, params = {}, {}, None
    try:
        for name in names:
            parse_variant_gin(name, size, batch_size, lengths, gin_files, gin_bindings)
            built[name], arguments = build_variant(name, batch_size, steps, params)
            params = built["plain"].state.params
            print(f"compiled {name} in {built[name].compile_seconds:.1f} s", flush=True)
    finally:
        gin.clear_config()
    params = built["plain"].state.params
    num_params = sum(p.size for p in jax.tree.leaves(params))
    optimizer = getattr(arguments["optimizer"], "__name__", repr(arguments["optimizer"]))
    print(
        f"T5.1.1 {size}: {num_params / 1e6:.2f} M parameters, {optimizer} "
        f"lr={arguments['learning_rate']}, activations {arguments['model'].config.dtype}; batch "
        f"{batch_size} × ({lengths['inputs']} input + {lengths['targets']} target) tokens; "
        f"{jax.device_count()} {jax.default_backend()} device(s); jax {jax.__version__}; "
        f"plain: {built['plain'].flops / 1e9:.2f} GFLOP/step, "
        f"{built['plain'].peak_bytes / 2**20:.0f} MiB peak (per device)",
        flush=True,
    )
    measure(built, rounds, steps)
    return report_rows(built, batch_size, lengths)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(train_lib.QuietLibraries())
    rows = benchmark(
        _SIZE.value,
        _BATCH.value,
        {"inputs": _INPUT_LENGTH.value, "targets": _TARGET_LENGTH.value},
        _ROUNDS.value,
        _STEPS.value,
        _VARIANTS.value,
        flags.FLAGS.gin_file,
        flags.FLAGS.gin_bindings,
    )
    print_table(HEADER, format_rows(rows), _MARKDOWN.value)


if __name__ == "__main__":
    app.run(
        main,
        flags_parser=lambda argv: app.parse_flags_with_usage(run_config.rewrite_gin_args(argv)),
    )
