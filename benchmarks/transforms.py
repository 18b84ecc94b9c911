"""Cost of each SAM variant relative to the plain optimizer, measured side by side.

A T5.1.1-style encoder-decoder of a few million parameters is trained with
AdamW on a batch of 64 examples × 128 tokens (96 input + 32 target), with
dropout. For every variant the script reports, relative to plain AdamW:

* time: median wall-clock time of one jitted step; the variants are run in
  interleaved rounds (plain, contrib, SAM, …, plain, contrib, …) so that
  machine noise affects them alike;
* FLOPs: XLA's `cost_analysis()` of the compiled step (machine-independent);
* temp memory: XLA's `memory_analysis().temp_size_in_bytes`, in parameter
  copies above plain's.

Rows marked bf16 run the same model with bfloat16 activations (float32
parameters) against AdamW on it; δ-SAM runs with its default forward-mode probe
and with the paper's finite differences; m-sharpness runs its 4 groups in
parallel (vmap) and one at a time. The time to draw δ-SAM's random direction is
printed after the table.

FSAM's mask (also F_GSAM's and F_ESAM's) is refreshed once every `interval`
steps: its time and FLOPs are amortised, ((interval − 1)·ordinary + refresh) /
interval. ESAM's rows are also compared with SAM f=1, after the table. Per-instance SAM
materialises one gradient per example, so it runs on a smaller batch and is
compared with plain AdamW on that same batch.

Usage: python benchmarks/transforms.py [--rounds=5] [--markdown] [--only=GSAM,ESAM]
"""

import dataclasses
import functools
import statistics
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app
from absl import flags
from harness import Cost
from harness import amortized
from harness import compiled_cost
from harness import print_table
from harness import refresh_cost
from harness import round_robin
from harness import synthetic_batch
from harness import timed

import sam_jax
from sam_jax import perturbation
from sam_jax.models import t5

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds over all variants.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
_PER_INSTANCE_BATCH = flags.DEFINE_integer("per_instance_batch", 8, "Batch of per-instance SAM.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the table as Markdown.")
_ONLY = flags.DEFINE_list(
    "only", [], "Measure only the variants whose names start with one of these (and baselines)."
)

INPUT_LENGTH, TARGET_LENGTH = 96, 32
VOCAB_SIZE = 2048
FSAM_INTERVAL = 100


@dataclasses.dataclass
class Variant:
    """One optimizer to measure: a jitted step and its compiled cost."""

    name: str
    step: Callable
    state: object
    batch: dict
    cost: Cost
    temp_bytes: int
    baseline: str = "AdamW"
    refresh_state: object = None  # FSAM: a state whose next step refreshes the mask
    refresh_cost: Cost = Cost(0.0, 0.0)
    times: list = dataclasses.field(default_factory=list)
    refresh_times: list = dataclasses.field(default_factory=list)

    def run(self, params, key, state=None):
        """Seconds of one step from `state` (default: the variant's ordinary state)."""
        return timed(self.step, params, self.state if state is None else state, key)[0]


def make_model(dtype=jnp.float32):
    """The benchmark's T5.1.1-style model (float32 parameters; `dtype` activations)."""
    config = t5.T5Config(
        vocab_size=VOCAB_SIZE,
        emb_dim=256,
        num_heads=4,
        head_dim=64,
        mlp_dim=1024,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.1,
        dtype=dtype,
    )
    params = nn.meta.unbox(t5.init_variables(config, jax.random.key(0))["params"])
    return t5.Transformer(config), params


def make_batch(num_examples, seed=0):
    return synthetic_batch(num_examples, INPUT_LENGTH, TARGET_LENGTH, VOCAB_SIZE, seed)


def make_loss_fn(model):
    def loss_fn(params, batch, key):
        logits = model.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            rngs={"dropout": key},
        )
        weights = (batch["decoder_target_tokens"] > 0).astype(jnp.float32)
        return t5.per_example_cross_entropy(
            logits, batch["decoder_target_tokens"], weights, example_normalizer=TARGET_LENGTH
        )

    return loss_fn


def compile_variant(name, tx, params, batch, loss_fn, baseline="AdamW"):
    """Jits one step of `tx`: plain or SAM through `update_from_loss`, or optax.contrib.sam."""

    def step(p, state, key):
        if isinstance(state, optax.contrib.SAMState):
            grads = jax.grad(lambda q: jnp.mean(loss_fn(q, batch, key)))(p)
            grad_fn = jax.grad(lambda q, _: jnp.mean(loss_fn(q, batch, key)))
            updates, state = tx.update(grads, state, p, grad_fn=grad_fn)
        else:
            updates, state = sam_jax.update_from_loss(tx, state, p, loss_fn, batch, key)[:2]
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    compiled = jax.jit(step).lower(params, state, jax.random.key(0)).compile()
    return Variant(
        name=name,
        step=compiled,
        state=state,
        batch=batch,
        cost=compiled_cost(compiled),
        temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
        baseline=baseline,
    )


def build_variants(model, params):
    loss_fn = make_loss_fn(model)
    bf16_loss_fn = make_loss_fn(make_model(jnp.bfloat16)[0])
    batch = make_batch(_BATCH.value)
    small_batch = make_batch(_PER_INSTANCE_BATCH.value)
    adamw = optax.adamw(1e-4)
    rho = 0.05
    quarter = dict(rho=rho, ascent_fraction=0.25)
    fisher = sam_jax.fisher_mask(sparsity=0.9, interval=FSAM_INTERVAL)
    contrib = optax.contrib.sam(
        adamw,
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    small = f"AdamW (batch {_PER_INSTANCE_BATCH.value})"

    def sam(**options):
        return sam_jax.sam(adamw, **options)

    gsam = sam_jax.gsam(0.3)
    esam = sam_jax.esam(beta=0.6, gamma=0.5)
    delta = sam_jax.delta_sam(1e-4)
    difference = sam_jax.delta_sam(1e-4, probe="finite_difference")
    draft = sam_jax.delta_sam_draft(3.0)
    f32, bf16 = ("AdamW", batch), ("AdamW bf16", batch)  # (baseline, batch)
    specs = [  # (name, transform, (baseline, batch))
        ("AdamW", adamw, f32),
        ("SAM ρ=0 (plain)", sam(rho=0.0), f32),
        ("optax.contrib.sam", contrib, f32),
        ("SAM f=1", sam(rho=rho), f32),
        ("SAM f=1/4", sam(**quarter), f32),
        ("δ-SAM f=1/4", sam(**quarter, reweight=delta), f32),
        ("δ-SAM draft f=1/4", sam(**quarter, reweight=draft), f32),
        ("δ-SAM f=1/4 finite diff.", sam(**quarter, reweight=difference), f32),
        ("FSAM f=1/4", sam(**quarter, mask=fisher), f32),
        ("ASAM f=1", sam(rho=0.5, adaptive=True), f32),
        ("SAM m=4 parallel", sam(rho=rho, sharpness_m=4), f32),
        ("SAM m=4 serial", sam(rho=rho, sharpness_m=4, parallel_groups=1), f32),
        ("GSAM f=1", sam(rho=rho, surrogate_gap=gsam), f32),
        ("ESAM β=0.6 γ=0.5", sam(rho=rho, esam=esam), f32),
        ("ESAM SWP β=0.6", sam(rho=rho, esam=sam_jax.esam(beta=0.6, gamma=1.0)), f32),
        ("ESAM SDS γ=0.5", sam(rho=rho, esam=sam_jax.esam(beta=1.0, gamma=0.5)), f32),
        ("F_GSAM f=1", sam(rho=rho, mask=fisher, surrogate_gap=gsam), f32),
        ("F_ESAM β=0.6 γ=0.5", sam(rho=rho, mask=fisher, esam=esam), f32),
        ("AdamW bf16", adamw, bf16),
        ("SAM f=1/4 bf16", sam(**quarter), bf16),
        ("δ-SAM f=1/4 bf16", sam(**quarter, reweight=delta), bf16),
        ("δ-SAM f=1/4 bf16 finite diff.", sam(**quarter, reweight=difference), bf16),
        (small, adamw, (small, small_batch)),
        ("per-instance SAM", sam_jax.per_instance_sam(adamw, rho), (small, small_batch)),
    ]
    baselines = {baseline for _, _, (baseline, _) in specs} | {"SAM f=1"}
    variants = {}
    for name, tx, (baseline, data) in specs:
        if _ONLY.value and name not in baselines and not name.startswith(tuple(_ONLY.value)):
            continue
        step_loss_fn = bf16_loss_fn if "bf16" in name else loss_fn
        variant = compile_variant(name, tx, params, data, step_loss_fn, baseline)
        if name.startswith(("FSAM", "F_")):
            # The state after init refreshes at count 0; count 1 is an ordinary step.
            variant.refresh_state = variant.state
            variant.state = variant.state._replace(count=jnp.int32(1))
            variant.refresh_cost = refresh_cost(
                fisher, params, data, loss_fn, variant.state.mask_state
            )
        variants[name] = variant
        print(f"compiled {name}", flush=True)
    return variants


def measure(variants, params, rounds):
    key = jax.random.key(1)
    runs = {}
    for name, variant in variants.items():
        runs[name] = functools.partial(variant.run, params, key)
        if variant.refresh_state is not None:
            runs[f"{name} (refresh)"] = functools.partial(
                variant.run, params, key, variant.refresh_state
            )
    times = round_robin(runs, rounds)
    for name, variant in variants.items():
        variant.times = times[name]
        variant.refresh_times = times.get(f"{name} (refresh)", [])


def per_step(variant):
    """(median seconds, Cost) of one step; FSAM's mask refresh amortised."""
    seconds, cost = statistics.median(variant.times), variant.cost
    if variant.refresh_state is not None:
        seconds = amortized(seconds, statistics.median(variant.refresh_times), FSAM_INTERVAL)
        ordinary = Cost(*(c - r for c, r in zip(cost, variant.refresh_cost, strict=True)))
        cost = Cost(*(amortized(o, c, FSAM_INTERVAL) for o, c in zip(ordinary, cost, strict=True)))
    return seconds, cost


def report(variants, param_bytes):
    rows = []
    for variant in variants.values():
        seconds, cost = per_step(variant)
        base = variants[variant.baseline]
        base_seconds, base_cost = per_step(base)
        rows.append(
            (
                variant.name,
                f"{1e3 * seconds:.0f}",
                f"{seconds / base_seconds:.2f}",
                f"{cost.flops / base_cost.flops:.2f}",
                f"{cost.bytes_accessed / base_cost.bytes_accessed:.2f}",
                f"{(variant.temp_bytes - base.temp_bytes) / param_bytes:+.2f}",
            )
        )
    header = (
        "variant",
        "ms/step",
        "time ×",
        "FLOPs ×",
        "bytes ×",
        "temp mem − plain (param copies)",
    )
    print_table(header, rows, _MARKDOWN.value)
    for variant in variants.values():
        if variant.refresh_state is not None:
            refresh = statistics.median(variant.refresh_times)
            ordinary = statistics.median(variant.times)
            flops = variant.cost.flops / (variant.cost.flops - variant.refresh_cost.flops)
            print(
                f"{variant.name}: a refresh step takes {1e3 * refresh:.0f} ms, "
                f"{refresh / ordinary:.2f} × an ordinary step ({flops:.2f} × in FLOPs)",
                flush=True,
            )


def report_esam_against_sam(variants):
    """ESAM's point is speed: its rows' time and FLOPs against SAM f=1's."""
    sam_seconds, sam_cost = per_step(variants["SAM f=1"])
    for name, variant in variants.items():
        if "ESAM" in name:
            seconds, cost = per_step(variant)
            print(
                f"{name} against SAM f=1: time × {seconds / sam_seconds:.2f}, "
                f"FLOPs × {cost.flops / sam_cost.flops:.2f}",
                flush=True,
            )


def report_random_direction(variants, params, rounds):
    """The cost of δ-SAM's random direction r ~ N(0, I), ‖r‖ = ρ, over all parameters."""
    draw = jax.jit(lambda key: perturbation.random_perturbation(key, params, 0.05))
    compiled = draw.lower(jax.random.key(0)).compile()
    times = round_robin({"r": lambda: timed(compiled, jax.random.key(1))[0]}, rounds)["r"]
    seconds, plain = statistics.median(times), statistics.median(variants["AdamW"].times)
    num_params = sum(p.size for p in jax.tree.leaves(params))
    print(
        f"drawing r over {num_params / 1e6:.2f} M parameters: {1e3 * seconds:.1f} ms "
        f"({1e9 * seconds / num_params:.1f} ns per parameter; {seconds / plain:.3f} × a plain "
        f"step of this model and batch)",
        flush=True,
    )


def main(argv):
    del argv
    model, params = make_model()
    num_params = sum(p.size for p in jax.tree.leaves(params))
    param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
    print(
        f"{num_params / 1e6:.2f} M parameters, batch {_BATCH.value} × "
        f"{INPUT_LENGTH + TARGET_LENGTH} tokens, {jax.device_count()} {jax.default_backend()} "
        f"device(s), jax {jax.__version__}",
        flush=True,
    )
    variants = build_variants(model, params)
    measure(variants, params, _ROUNDS.value)
    report(variants, param_bytes)
    report_esam_against_sam(variants)
    report_random_direction(variants, params, _ROUNDS.value)


if __name__ == "__main__":
    app.run(main)
