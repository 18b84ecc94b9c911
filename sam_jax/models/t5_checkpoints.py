"""Pretrained T5.1.1 weights for `sam_jax.models.t5`: T5X checkpoints and Hugging Face dirs.

`from_pretrained(path)` returns `(t5.Transformer, params)` with float32 numpy params
whose tree is exactly `nn.meta.unbox(t5.init_variables(config, rng)['params'])`;
with `shardings` every parameter is instead a `jax.Array` read straight into its
sharding, each process reading only the slices its devices hold, so that no host
ever holds the whole checkpoint (T5.1.1 XL's 11 GB)::

    model, params = from_pretrained("gs://.../t5_1_1_base/checkpoint_1000000")
    model, params = from_pretrained("flan-t5-small/", dropout_rate=0.0)
    model, params = from_pretrained(path, shardings=lambda config: param_shardings)
    logits = model.apply({"params": params}, encoder_tokens, decoder_inputs,
                         decoder_targets, enable_dropout=False)

Three layouts are read (chosen from the directory's contents):

* A T5X checkpoint as T5X writes it today: `checkpoint_<step>/` holding an Orbax
  PyTree checkpoint in `state/` (`state/_METADATA`), the train state's
  `state_dict()`: `target/...` (the parameters) and `state/...` (step, optimizer
  `param_states`). Only `target` is read, with `orbax.checkpoint`: the tree
  metadata gives every parameter's path and shape, the config is inferred from
  those shapes (and names and shapes are checked) before any array is read, then
  the parameters are restored with `partial_restore` as float32 numpy arrays, or
  with Orbax's sharded restore (`ArrayRestoreArgs`: each device's slice is read
  by TensorStore), in groups of at most `max_read_bytes` (one Orbax restore call
  per group; one per parameter when a parameter exceeds it). The optimizer state
  is never read. The parameter names are those of T5X's
  `t5x/examples/t5/network.py`, which ours follow.
* A legacy T5X checkpoint: `checkpoint_<step>/checkpoint` (msgpack of
  {'version', 'optimizer': {'target', 'state'}} whose large arrays are TensorStore
  zarr specs, e.g. the released `gs://t5-data/pretrained_models/t5x/...`
  checkpoints). The msgpack file (specs and small arrays only) is read whole, then
  each `target` parameter is read (whole, or one slice per shard) from its own
  zarr array with `tensorstore`, cast to float32 on read; the optimizer state's
  arrays are never opened.
* A Hugging Face T5 directory: `config.json` (`model_type` 't5' or 'mt5',
  `feed_forward_proj` 'gated-gelu', i.e. T5 v1.1 / mT5 / Flan-T5) and a single
  `model.safetensors` with `T5ForConditionalGeneration` names, read one tensor
  (or one slice of one tensor: `safe_open(...).get_slice(name)[index]`) at a
  time; PyTorch [out, in] weights are transposed, so a slice of one is the
  transposed slice of the stored matrix. `encoder.embed_tokens.weight` /
  `decoder.embed_tokens.weight` (and `lm_head.weight` of a tied model), when
  persisted, must equal `shared.weight` (compared in blocks of rows) and are
  dropped.

In every layout every tensor must be used: an unused or missing tensor, or one of
the wrong shape, is a one-line `ValueError` naming it. Relative position buckets
come from the checkpoint's tables; `relative_attention_max_distance` from HF's
config (T5X checkpoints do not record it: 128, T5X's value, unless overridden).

Sharded reads: `jax.make_array_from_callback` (HF, legacy) asks for one slice per
addressable device; devices holding the same slice (replicas along the data axis)
share one read. Chunked layouts (zarr) fetch the chunks a slice overlaps.

Numerics: our model computes T5X's function. HF's bucketing of relative positions
omits T5X's float32 epsilon, so the two can put an offset that is exactly
`max_exact * (max_distance / max_exact) ** (k / n)` into neighbouring buckets;
no offset below `max_exact` (8 or 16 for 32 buckets) is affected.
"""

import contextlib
import functools
import json
import math
import os
import posixpath
import re
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import linen as nn
from flax import serialization
from safetensors import safe_open

from sam_jax.models import t5
from sam_jax.models import tensor_matching

Path = tensor_matching.Path
# A slice of a parameter, as `jax.make_array_from_callback` requests it.
Index = tuple[slice, ...]
# A pytree of `jax.sharding.Sharding` with the parameters' structure, or a function of
# the checkpoint's `t5.T5Config` returning one (None: numpy parameters).
Shardings = Any

# T5X's T5.1.1 layer norm epsilon; our RMSNorm uses it.
_LAYER_NORM_EPSILON = 1e-6
_DEFAULT_MAX_READ_BYTES = 1 << 30
# Persisted HF embedding copies are compared with `shared.weight` this many bytes at a time.
_COMPARE_BYTES = 1 << 24


def abstract_params(config: t5.T5Config) -> dict[Path, tuple[int, ...]]:
    """{parameter path: shape} of `t5.Transformer(config)` (nothing allocated)."""
    shapes = jax.eval_shape(functools.partial(t5.init_variables, config), jax.random.key(0))
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(shapes["params"]))
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


class _Checkpoint(NamedTuple):
    """An opened checkpoint whose names and shapes are checked; no array read yet.

    Attributes:
        config: the model's config (inferred, with the overrides).
        shapes: {parameter path: shape} of `t5.Transformer(config)`.
        load: {path: sharding or None} -> an iterator of (path, parameter): numpy
            for None, else a `jax.Array` with that sharding.
    """

    config: t5.T5Config
    shapes: dict[Path, tuple[int, ...]]
    load: Callable[[Mapping[Path, Any]], Iterator[tuple[Path, Any]]]


def from_pretrained(
    path: str | os.PathLike,
    *,
    shardings: Shardings = None,
    max_read_bytes: int = _DEFAULT_MAX_READ_BYTES,
    **config_overrides: Any,
) -> tuple[t5.Transformer, dict[str, Any]]:
    """Loads T5.1.1 parameters from a T5X checkpoint or a Hugging Face T5 directory.

    Example::

        shardings = lambda config: partitioner.shardings(
            jax.eval_shape(functools.partial(t5.init_variables, config), key)["params"])
        model, params = from_pretrained(path, shardings=shardings)

    Args:
        path: a T5X `checkpoint_<step>` directory, Orbax (or its `state/`
            sub-directory) or legacy, local or any path Orbax / TensorStore read
            (gs://); or a local HF directory with `config.json` and
            `model.safetensors`.
        shardings: None for numpy parameters; else a pytree of
            `jax.sharding.Sharding` with the parameters' structure, or a function
            of the checkpoint's `t5.T5Config` returning one or None (called once
            names and shapes are checked, before any array is read: it may reject
            the model by raising). Each parameter is then a `jax.Array` with its
            sharding, read slice by slice: no host holds the whole checkpoint.
        max_read_bytes: Orbax T5X checkpoints: the float32 bytes restored per call.
        **config_overrides: `t5.T5Config` fields, e.g. `dtype=jnp.bfloat16`,
            `dropout_rate=0.0`, `relative_attention_max_distance`.

    Returns:
        (model, params): the `t5.Transformer` and its float32 parameters (numpy,
        or `jax.Array`s with `shardings`), the tree of `model.init(...)['params']`
        without the logical-axis boxes.

    Raises:
        ValueError: a one-line message naming the path for a directory of neither
            layout or an unsupported config, or naming an unused, missing or
            mis-shaped tensor, or shardings whose tree is not the parameters'.
    """
    with contextlib.ExitStack() as stack:
        checkpoint = _open(path, stack, max_read_bytes, config_overrides)
        by_path = _shardings_by_path(checkpoint, shardings, os.fspath(path))
        params: dict[str, Any] = {}
        for parameter_path, value in checkpoint.load(by_path):
            tensor_matching.set_path(params, parameter_path, value)
    return t5.Transformer(checkpoint.config), params


def _open(
    path: str | os.PathLike,
    stack: contextlib.ExitStack,
    max_read_bytes: int,
    overrides: Mapping[str, Any],
) -> _Checkpoint:
    """Opens the checkpoint of whichever layout `path` holds (files stay open in `stack`)."""
    text = os.fspath(path)
    directory = epath.Path(text if "://" in text else os.path.abspath(text))  # Orbax: absolute
    if (directory / "config.json").exists() and (directory / "model.safetensors").exists():
        return _open_hf(directory, stack, overrides)
    for state_dir in (directory / "state", directory):
        if (state_dir / "_METADATA").exists():
            return _open_t5x(state_dir, stack, max_read_bytes, overrides)
    if (directory / "checkpoint").exists():
        return _open_t5x_legacy(directory, overrides)
    hint = ""
    if directory.is_dir() and any(
        re.fullmatch(r"checkpoint_\d+", p.name) for p in directory.iterdir()
    ):
        hint = " (pass one of its checkpoint_<step> sub-directories)"
    raise ValueError(
        f"{path}: neither a Hugging Face T5 directory (config.json + model.safetensors) nor "
        f"a T5X checkpoint directory (checkpoint_<step>/ with state/_METADATA, or a "
        f"legacy 'checkpoint' file){hint}."
    )


def _shardings_by_path(checkpoint: _Checkpoint, shardings: Shardings, where: str) -> dict:
    """{parameter path: its sharding}, all None without shardings.

    Raises:
        ValueError: naming the paths the shardings have and the parameters do not,
            and the reverse.
    """
    tree = shardings(checkpoint.config) if callable(shardings) else shardings
    if tree is None:
        return dict.fromkeys(checkpoint.shapes)
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    given = {tuple(_key_name(k) for k in p): sharding for p, sharding in leaves}
    extra = sorted("/".join(p) for p in given.keys() - checkpoint.shapes.keys())
    missing = sorted("/".join(p) for p in checkpoint.shapes.keys() - given.keys())
    if extra or missing:
        raise ValueError(
            f"{where}: the shardings are not those of the checkpoint's parameters: "
            f"extra {tensor_matching.name_sample(extra)}, "
            f"missing {tensor_matching.name_sample(missing)}."
        )
    return given


def _match(found: Mapping[str, tuple[int, ...]], wanted: Mapping[str, tuple[int, ...]], where: str):
    """Raises a one-line ValueError for unused, missing or mis-shaped tensors."""
    tensor_matching.check_names(found.keys(), wanted.keys(), f"{where} (T5.1.1)")
    tensor_matching.check_shapes(found, wanted, where)


def _load_slices(
    readers: Mapping[Path, Callable[[Index], np.ndarray]],
    shapes: Mapping[Path, tuple[int, ...]],
    shardings: Mapping[Path, Any],
) -> Iterator[tuple[Path, Any]]:
    """(path, parameter) from per-parameter float32 slice readers, in `readers`' order.

    Without a sharding a parameter is read whole (contiguous numpy); with one,
    `jax.make_array_from_callback` reads each distinct device slice once.
    """
    for path, read in readers.items():
        shape, sharding = shapes[path], shardings[path]
        if sharding is None:
            yield path, np.ascontiguousarray(read(tuple(slice(None) for _ in shape)))
        else:
            yield path, jax.make_array_from_callback(shape, sharding, _once_per_index(read))


def _once_per_index(read: Callable[[Index], np.ndarray]) -> Callable[[Index], np.ndarray]:
    """`read`, remembering its slices: replicas of a shard share one read."""
    slices: dict[tuple, np.ndarray] = {}

    def cached(index: Index) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)  # slices are unhashable
        if key not in slices:
            slices[key] = read(index)
        return slices[key]

    return cached


# ------------------------------------------------------------------------------------
# T5X (Orbax) checkpoints.
# ------------------------------------------------------------------------------------

_T5X_PARAMS = "target"


def _t5x_name(path: Path) -> str:
    return "/".join((_T5X_PARAMS,) + path)


def t5x_config_from_shapes(shapes: Mapping[Path, tuple[int, ...]], **overrides: Any) -> t5.T5Config:
    """The `t5.T5Config` of T5X T5.1.1 parameters {path under 'target': shape}.

    Layers are counted from `{encoder,decoder}/layers_<i>`; heads and buckets come
    from the encoder's relative position table, the head width from the first
    encoder query kernel, the MLP width from its `wi_0`; no `decoder/logits_dense`
    means a tied output head. `overrides` (any `T5Config` field) apply last.

    Raises:
        ValueError: naming a tensor the inference needs that is absent or not 2-D.
    """

    def shape(*path: str) -> tuple[int, int]:
        got = shapes.get(path)
        if got is None or len(got) != 2:
            what = "missing" if got is None else f"has shape {tuple(got)}"
            raise ValueError(
                f"Tensor {_t5x_name(path)!r} {what}; a T5.1.1 (gated-GELU) T5X checkpoint "
                "needs it as a matrix."
            )
        return got

    def layers(stack: str) -> int:
        indices = [
            int(m.group(1))
            for p in shapes
            if len(p) > 1 and p[0] == stack
            for m in [re.fullmatch(r"layers_(\d+)", p[1])]
            if m
        ]
        return max(indices) + 1 if indices else 0

    vocab_size, emb_dim = shape("token_embedder", "embedding")
    num_heads, num_buckets = shape("encoder", "relpos_bias", "rel_embedding")
    _, joined = shape("encoder", "layers_0", "attention", "query", "kernel")
    _, mlp_dim = shape("encoder", "layers_0", "mlp", "wi_0", "kernel")
    fields = dict(
        vocab_size=vocab_size,
        emb_dim=emb_dim,
        num_heads=num_heads,
        head_dim=max(joined // num_heads, 1),
        mlp_dim=mlp_dim,
        num_encoder_layers=layers("encoder"),
        num_decoder_layers=layers("decoder"),
        relative_attention_num_buckets=num_buckets,
        logits_via_embedding=("decoder", "logits_dense", "kernel") not in shapes,
    )
    return t5.T5Config(**{**fields, **overrides})


def _t5x_config(
    shapes: Mapping[Path, tuple[int, ...]], where: str, overrides: Mapping[str, Any]
) -> tuple[t5.T5Config, dict[Path, tuple[int, ...]]]:
    """The inferred config and our parameter shapes, once names and shapes are checked."""
    try:
        config = t5x_config_from_shapes(shapes, **overrides)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    wanted = abstract_params(config)
    _match(
        {_t5x_name(p): s for p, s in shapes.items()},
        {_t5x_name(p): s for p, s in wanted.items()},
        where,
    )
    return config, wanted


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "idx", key)))


def _open_t5x(
    state_dir: epath.Path,
    stack: contextlib.ExitStack,
    max_read_bytes: int,
    overrides: Mapping[str, Any],
) -> _Checkpoint:
    """Opens `target` of a T5X Orbax checkpoint from its tree metadata (see the module doc)."""
    handler = ocp.PyTreeCheckpointHandler()
    stack.callback(handler.close)
    tree = handler.metadata(state_dir).tree
    if not isinstance(tree, Mapping) or not isinstance(tree.get(_T5X_PARAMS), Mapping):
        raise ValueError(f"{state_dir}: the Orbax checkpoint has no '{_T5X_PARAMS}' (params).")
    leaves = jax.tree_util.tree_leaves_with_path(tree[_T5X_PARAMS])
    shapes = {tuple(_key_name(k) for k in p): tuple(leaf.shape) for p, leaf in leaves}
    config, wanted = _t5x_config(shapes, str(state_dir), overrides)
    load = functools.partial(_restore_t5x, handler, state_dir, wanted, max_read_bytes)
    return _Checkpoint(config, wanted, load)


def _restore_args(shape: tuple[int, ...], sharding: Any) -> ocp.RestoreArgs:
    """Orbax's restore arguments of one float32 parameter: numpy, or sharded jax.Array."""
    if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=np.float32)


def _restore_t5x(
    handler: ocp.PyTreeCheckpointHandler,
    state_dir: epath.Path,
    shapes: Mapping[Path, tuple[int, ...]],
    max_read_bytes: int,
    shardings: Mapping[Path, Any],
) -> Iterator[tuple[Path, Any]]:
    """(path, parameter) of `target/...`, restored in groups by Orbax's partial restore."""
    for group in _groups(shapes, max_read_bytes):
        item: dict[str, Any] = {}
        restore_args: dict[str, Any] = {}
        for p in group:
            tensor_matching.set_path(item, (_T5X_PARAMS,) + p, 0)
            tensor_matching.set_path(
                restore_args, (_T5X_PARAMS,) + p, _restore_args(shapes[p], shardings[p])
            )
        restored = handler.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
        for p in group:
            yield p, tensor_matching.get_path(restored[_T5X_PARAMS], p)


def _is_tensorstore_spec(node: Any) -> bool:
    return isinstance(node, Mapping) and "driver" in node and ("kvstore" in node or "path" in node)


def _legacy_leaves(tree: Any, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) of a legacy T5X state dict; TensorStore specs are leaves."""
    if isinstance(tree, Mapping) and not _is_tensorstore_spec(tree):
        for key, value in tree.items():
            yield from _legacy_leaves(value, prefix + (str(key),))
    else:
        yield prefix, tree


def _legacy_shape(leaf: Any) -> tuple[int, ...]:
    if _is_tensorstore_spec(leaf):
        return tuple(leaf.get("metadata", {}).get("shape", ()))
    return tuple(np.shape(leaf))


def _legacy_reader(leaf: Any, checkpoint_dir: str) -> Callable[[Index], np.ndarray]:
    """The float32 slice reader of one legacy T5X array: inline (msgpack) or zarr.

    A zarr TensorStore is opened on the first read, and each read fetches only
    the chunks its slice overlaps.
    """
    if not _is_tensorstore_spec(leaf):
        inline = np.asarray(leaf, np.float32)
        return lambda index: inline[index]
    store = functools.cache(functools.partial(_open_legacy_store, leaf, checkpoint_dir))
    return lambda index: np.asarray(store()[index].read().result(), np.float32)


def _open_legacy_store(spec: Mapping[str, Any], checkpoint_dir: str) -> Any:
    """The float32 (cast) TensorStore of a legacy T5X zarr spec.

    As T5X does, the spec's relative path is resolved against the checkpoint
    directory (a gs:// directory reads from its bucket, whatever bucket or driver was
    recorded) and the stored chunking and compressor are not required to match.
    """
    import tensorstore as ts  # noqa: PLC0415  (an orbax dependency; only this layout needs it)

    spec = json.loads(json.dumps(spec))  # a deep copy
    spec.get("metadata", {}).pop("chunks", None)
    spec.get("metadata", {}).pop("compressor", None)
    kvstore = spec.get("kvstore")
    if isinstance(kvstore, Mapping) and "path" in kvstore:
        relative = kvstore["path"]
    else:  # tensorstore < 0.1.14 specs: the path at the top level
        relative = spec.pop("path")
    bucket = re.fullmatch(r"gs://([^/]*)/?(.*)", checkpoint_dir, re.DOTALL)
    if bucket:
        path = posixpath.join(bucket.group(2), relative)
        spec["kvstore"] = {"driver": "gcs", "bucket": bucket.group(1), "path": path}
    else:
        spec["kvstore"] = {"driver": "file", "path": os.path.join(checkpoint_dir, relative)}
    return ts.open({"driver": "cast", "dtype": "float32", "base": spec}, open=True).result()


def _open_t5x_legacy(checkpoint_dir: epath.Path, overrides: Mapping[str, Any]) -> _Checkpoint:
    """Opens `optimizer/target` of a legacy T5X checkpoint (msgpack + TensorStore).

    The msgpack file holds only TensorStore specs and small arrays; each parameter is
    then read from its own zarr array, and the optimizer state's are never opened.
    """
    contents = serialization.msgpack_restore((checkpoint_dir / "checkpoint").read_bytes())
    target = (
        contents.get("optimizer", {}).get(_T5X_PARAMS) if isinstance(contents, Mapping) else None
    )
    if not isinstance(target, Mapping):
        raise ValueError(
            f"{checkpoint_dir}: the legacy T5X checkpoint has no 'optimizer/{_T5X_PARAMS}'."
        )
    leaves = dict(_legacy_leaves(target))
    shapes = {p: _legacy_shape(leaf) for p, leaf in leaves.items()}
    config, wanted = _t5x_config(shapes, str(checkpoint_dir), overrides)
    readers = {p: _legacy_reader(leaves[p], os.fspath(checkpoint_dir)) for p in wanted}
    return _Checkpoint(config, wanted, functools.partial(_load_slices, readers, wanted))


def _groups(shapes: Mapping[Path, tuple[int, ...]], max_bytes: int) -> Iterator[list[Path]]:
    """Consecutive parameter paths in groups of at most `max_bytes` float32 bytes (≥ 1)."""
    group: list[Path] = []
    size = 0
    for path, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        if group and size + nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(path)
        size += nbytes
    if group:
        yield group


# ------------------------------------------------------------------------------------
# Hugging Face directories.
# ------------------------------------------------------------------------------------


class _Tensor(NamedTuple):
    """Where an HF tensor goes: a parameter path; `transpose` for [out, in] weights."""

    path: Path
    transpose: bool


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> t5.T5Config:
    """The `t5.T5Config` of an HF T5 v1.1 / mT5 `config.json` dict.

    Raises:
        ValueError: for a model type, feed-forward or layer norm epsilon that
            `sam_jax.models.t5` does not implement.
    """
    model_type = hf.get("model_type")
    if model_type not in ("t5", "mt5"):
        raise ValueError(f"Unsupported model_type {model_type!r} (expected 't5' or 'mt5').")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("gated-gelu",):
        raise ValueError(
            f"Unsupported feed_forward_proj {proj!r}: only T5.1.1's 'gated-gelu' is implemented."
        )
    eps = hf.get("layer_norm_epsilon", _LAYER_NORM_EPSILON)
    if not math.isclose(eps, _LAYER_NORM_EPSILON):
        raise ValueError(f"Unsupported layer_norm_epsilon {eps} (only {_LAYER_NORM_EPSILON}).")
    needed = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    absent = [k for k in needed if k not in hf]
    if absent:
        raise ValueError(f"config.json lacks {absent}.")
    num_decoder_layers = hf.get("num_decoder_layers")
    fields = dict(
        vocab_size=hf["vocab_size"],
        emb_dim=hf["d_model"],
        num_heads=hf["num_heads"],
        head_dim=hf["d_kv"],
        mlp_dim=hf["d_ff"],
        num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf["num_layers"] if num_decoder_layers is None else num_decoder_layers,
        dropout_rate=hf.get("dropout_rate", 0.1),
        # HF's PretrainedConfig ties by default; T5 v1.1 configs say false.
        logits_via_embedding=hf.get("tie_word_embeddings", True),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
    )
    return t5.T5Config(**{**fields, **overrides})


def hf_tensor_map(config: t5.T5Config) -> dict[str, _Tensor]:
    """HF `T5ForConditionalGeneration` tensor names -> our parameter paths.

    Relative attention tables live in block 0 of each stack (HF [buckets, heads]);
    attention `q`/`k`/`v`/`o` and `DenseReluDense.wi_0`/`wi_1`/`wo` are PyTorch
    [out, in] matrices; layer norms are vectors; `lm_head.weight` [vocab, d_model]
    only when the head is not tied.
    """
    tensors = {"shared.weight": _Tensor(("token_embedder", "embedding"), False)}

    def attention(prefix: str, path: Path) -> None:
        for hf_name, name in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
            tensors[f"{prefix}.{hf_name}.weight"] = _Tensor(path + (name, "kernel"), True)

    def mlp(prefix: str, path: Path) -> None:
        for name in ("wi_0", "wi_1", "wo"):
            tensors[f"{prefix}.DenseReluDense.{name}.weight"] = _Tensor(
                path + ("mlp", name, "kernel"), True
            )

    def norm(name: str, path: Path) -> None:
        tensors[name] = _Tensor(path + ("scale",), False)

    for stack, count, final in (
        ("encoder", config.num_encoder_layers, "encoder_norm"),
        ("decoder", config.num_decoder_layers, "decoder_norm"),
    ):
        tensors[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = _Tensor(
            (stack, "relpos_bias", "rel_embedding"), True
        )
        for i in range(count):
            block, layer = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
            if stack == "encoder":
                attention(f"{block}.0.SelfAttention", layer + ("attention",))
                norm(f"{block}.0.layer_norm.weight", layer + ("pre_attention_layer_norm",))
                mlp(f"{block}.1", layer)
                norm(f"{block}.1.layer_norm.weight", layer + ("pre_mlp_layer_norm",))
            else:
                attention(f"{block}.0.SelfAttention", layer + ("self_attention",))
                norm(f"{block}.0.layer_norm.weight", layer + ("pre_self_attention_layer_norm",))
                attention(f"{block}.1.EncDecAttention", layer + ("encoder_decoder_attention",))
                norm(f"{block}.1.layer_norm.weight", layer + ("pre_cross_attention_layer_norm",))
                mlp(f"{block}.2", layer)
                norm(f"{block}.2.layer_norm.weight", layer + ("pre_mlp_layer_norm",))
        norm(f"{stack}.final_layer_norm.weight", (stack, final))
    if not config.logits_via_embedding:
        tensors["lm_head.weight"] = _Tensor(("decoder", "logits_dense", "kernel"), True)
    return tensors


def _tied_copies(config: t5.T5Config) -> tuple[str, ...]:
    """HF names that, when persisted, are copies of `shared.weight` (checked, dropped)."""
    names = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    return names + (("lm_head.weight",) if config.logits_via_embedding else ())


def _open_hf(
    directory: epath.Path, stack: contextlib.ExitStack, overrides: Mapping[str, Any]
) -> _Checkpoint:
    """Opens an HF T5 directory: its config and the names and shapes of its tensors."""
    config_path = directory / "config.json"
    try:
        config = config_from_hf(json.loads(config_path.read_text()), **overrides)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    path = os.fspath(directory / "model.safetensors")
    f = stack.enter_context(safe_open(path, framework="numpy"))
    tensors = hf_tensor_map(config)
    wanted = abstract_params(config)
    found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    copies = [name for name in _tied_copies(config) if name in found]
    _match(
        {k: v for k, v in found.items() if k not in copies},
        {
            name: wanted[t.path][::-1] if t.transpose else wanted[t.path]
            for name, t in tensors.items()
        },
        path,
    )
    readers = {
        t.path: functools.partial(_read_hf_slice, f, name, t.transpose)
        for name, t in tensors.items()
    }

    def load(shardings: Mapping[Path, Any]) -> Iterator[tuple[Path, Any]]:
        for name in copies:
            _check_copy(f, name, path)
        yield from _load_slices(readers, wanted, shardings)

    return _Checkpoint(config, wanted, load)


def _read_hf_slice(f: Any, name: str, transpose: bool, index: Index) -> np.ndarray:
    """Slice `index` of our parameter stored as HF tensor `name` (transposed if [out, in]).

    Only that slice is read: a slice of a transposed matrix is the transpose of the
    stored matrix's slice at the reversed index.
    """
    if transpose:
        return np.asarray(f.get_slice(name)[index[::-1]], np.float32).T
    return np.asarray(f.get_slice(name)[index], np.float32)


def _check_copy(f: Any, name: str, path: str) -> None:
    """Raises a one-line ValueError unless HF tensor `name` equals `shared.weight`.

    Both are compared in blocks of rows of at most `_COMPARE_BYTES` float32 bytes.
    """
    shared, copy = f.get_slice("shared.weight"), f.get_slice(name)
    shape = tuple(shared.get_shape())
    rows = max(1, _COMPARE_BYTES // (4 * math.prod(shape[1:])))
    blocks = [slice(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]
    same = tuple(copy.get_shape()) == shape and all(
        np.array_equal(copy[block], shared[block]) for block in blocks
    )
    if not same:
        raise ValueError(f"{path}: tensor {name!r} is not a copy of 'shared.weight'.")


def to_hf_state_dict(config: t5.T5Config, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of the HF mapping: HF-named float32 tensors for `save_file`."""
    state = {}
    for name, t in hf_tensor_map(config).items():
        value = np.asarray(tensor_matching.get_path(params, t.path), np.float32)
        state[name] = np.ascontiguousarray(value.T if t.transpose else value)
    return state


def to_hf_config(config: t5.T5Config) -> dict[str, Any]:
    """An HF `config.json` dict (T5 v1.1 conventions) describing `config`."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": _LAYER_NORM_EPSILON,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": config.logits_via_embedding,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


__all__ = [
    "abstract_params",
    "config_from_hf",
    "from_pretrained",
    "hf_tensor_map",
    "t5x_config_from_shapes",
    "to_hf_config",
    "to_hf_state_dict",
]
