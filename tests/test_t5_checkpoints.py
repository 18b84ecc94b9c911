"""Tests of sam_jax.models.t5_checkpoints.from_pretrained (T5X Orbax and HF T5 layouts).

The T5X fixtures (tests/data/t5x_tiny, see its README.txt: an Orbax checkpoint and a
legacy msgpack + TensorStore one of the same parameters) were written by T5X itself
(commit cc342d41), with T5X's logits on three inputs; T5X is not needed here. The HF
directory is built in tmp_path from the same parameters with our mapping, which is
checked independently: against the tensor names and PyTorch shapes of HF's
`T5ForConditionalGeneration` (T5 v1.1, gated-GELU), and by a plain numpy forward
pass written from HF's T5 definition that must reproduce T5X's logits.

Sharded loading runs on 8 simulated CPU devices (tests/conftest.py) with a
(data 4 x model 2) mesh: the reads of each layout are recorded where the library
meets safetensors, TensorStore and Orbax, to show that each one is one device
slice of one parameter.
"""

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import time
import tracemalloc

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore
from etils import epath
from flax import linen as nn
from flax import serialization
from orbax.checkpoint._src.serialization import serialization as orbax_serialization
from safetensors.numpy import save_file

from sam_jax import partitioning
from sam_jax.models import t5
from sam_jax.models import t5_checkpoints

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "t5x_tiny")
CHECKPOINT = os.path.join(FIXTURE, "checkpoint_0")
LEGACY_CHECKPOINT = os.path.join(FIXTURE, "legacy", "checkpoint_0")
# The fixture's shapes (README.txt); every dimension differs from the others.
CONFIG = t5.T5Config(
    vocab_size=80,
    emb_dim=32,
    num_heads=4,
    head_dim=6,
    mlp_dim=48,
    num_encoder_layers=1,
    num_decoder_layers=2,
)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnames="config", compiler_options=FAST_COMPILE)
def _logits(config, params, encoder_tokens, decoder_inputs, decoder_targets):
    return t5.Transformer(config).apply(
        {"params": params}, encoder_tokens, decoder_inputs, decoder_targets, enable_dropout=False
    )


@pytest.fixture(scope="module")
def t5x_outputs():
    with np.load(os.path.join(FIXTURE, "t5x_logits.npz")) as data:
        return dict(data)


def logits_of(model, params, outputs):
    return np.asarray(
        _logits(
            model.config,
            params,
            outputs["encoder_input_tokens"],
            outputs["decoder_input_tokens"],
            outputs["decoder_target_tokens"],
        )
    )


@pytest.fixture(scope="module")
def loaded():
    return t5_checkpoints.from_pretrained(CHECKPOINT)


def params_shardings(partitioner):
    """`from_pretrained(shardings=...)`: the params' shardings of the checkpoint's model."""

    def shardings(config):
        abstract = jax.eval_shape(functools.partial(t5.init_variables, config), jax.random.key(0))
        return partitioner.shardings(abstract["params"])

    return shardings


@pytest.fixture(scope="module")
def sharded():
    """The shardings function of a (data 4 x model 2) mesh with T5's logical axis rules."""
    assert jax.device_count() == 8  # tests/conftest.py
    return params_shardings(partitioning.Partitioner(2, t5.DEFAULT_LOGICAL_AXIS_RULES))


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ------------------------------------------------------------------------------------
# T5X.
# ------------------------------------------------------------------------------------


def test_t5x_checkpoint_reproduces_t5x_logits(loaded, t5x_outputs):
    model, params = loaded
    # Inferred from the shapes; T5X does not record dropout: the T5Config default.
    assert model.config == CONFIG
    abstract = jax.eval_shape(functools.partial(t5.init_variables, CONFIG), jax.random.key(0))
    expected = nn.meta.unbox(abstract["params"])
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert got.shape == want.shape
    logits = logits_of(model, params, t5x_outputs)
    np.testing.assert_allclose(logits, t5x_outputs["logits"], rtol=1e-5, atol=1e-5)


def test_t5x_reads_only_params_in_bounded_groups(loaded, monkeypatch):
    requested = []
    restore = ocp.PyTreeCheckpointHandler.restore

    def spy(self, directory, args=None):
        requested.append(jax.tree_util.tree_leaves_with_path(args.item))
        return restore(self, directory, args=args)

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", spy)
    # A budget below every parameter's size: one restore call per parameter.
    model, params = t5_checkpoints.from_pretrained(
        os.path.join(CHECKPOINT, "state"), max_read_bytes=1, dropout_rate=0.0
    )
    assert model.config.dropout_rate == 0.0
    num_params = len(jax.tree.leaves(params))
    assert len(requested) == num_params
    assert all(len(leaves) == 1 for leaves in requested)
    assert all(path[0].key == "target" for leaves in requested for path, _ in leaves)
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def write_t5x_checkpoint(directory, target):
    """An Orbax checkpoint in T5X's layout: checkpoint_<step>/state/{target, state}."""
    state = {"step": np.int32(7), "param_states": {"encoder": {"v": np.ones(3, np.float32)}}}
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(
            epath.Path(directory) / "state",
            args=ocp.args.PyTreeSave({"target": target, "state": state}),
        )
    return directory


def edited(params, edit):
    """A deep copy of nested dicts `params`, changed in place by `edit`."""
    copy = jax.tree.map(np.array, params)
    edit(copy)
    return copy


def test_t5x_written_by_orbax_round_trips(loaded, tmp_path):
    path = write_t5x_checkpoint(str(tmp_path / "checkpoint_7"), loaded[1])
    _, params = t5_checkpoints.from_pretrained(path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def _add_t5x(p):
    p["encoder"]["layers_0"]["attention"]["bias"] = np.zeros(32, np.float32)


def _drop_t5x(p):
    del p["decoder"]["layers_1"]["mlp"]["wo"]


def _reshape_t5x(p):
    p["decoder"]["layers_1"]["self_attention"]["value"]["kernel"] = np.zeros((32, 25), np.float32)


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (_add_t5x, ["unused ['target/encoder/layers_0/attention/bias']", "missing []"]),
        (_drop_t5x, ["unused []", "missing ['target/decoder/layers_1/mlp/wo/kernel']"]),
        (
            _reshape_t5x,
            [
                "'target/decoder/layers_1/self_attention/value/kernel' has shape (32, 25)",
                "(32, 24)",
            ],
        ),
    ],
    ids=["extra", "missing", "shape"],
)
@pytest.mark.parametrize("with_shardings", [False, True], ids=["numpy", "sharded"])
def test_t5x_extra_missing_or_misshaped_tensor_is_an_error(
    loaded, tmp_path, edit, fragments, with_shardings, sharded
):
    path = write_t5x_checkpoint(str(tmp_path / "checkpoint_1"), edited(loaded[1], edit))
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(path, shardings=sharded if with_shardings else None)
    assert_one_line_error(excinfo, *fragments)


def test_t5x_without_a_tensor_needed_for_the_config_is_an_error(loaded, tmp_path):
    def drop(p):
        del p["encoder"]["relpos_bias"]

    path = write_t5x_checkpoint(str(tmp_path / "checkpoint_1"), edited(loaded[1], drop))
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(path)
    assert_one_line_error(excinfo, path, "'target/encoder/relpos_bias/rel_embedding' missing")


def test_t5x_tied_head_is_inferred(loaded, tmp_path, t5x_outputs):
    def untie(p):
        del p["decoder"]["logits_dense"]

    path = write_t5x_checkpoint(str(tmp_path / "checkpoint_1"), edited(loaded[1], untie))
    model, params = t5_checkpoints.from_pretrained(path)
    assert model.config.logits_via_embedding
    assert "logits_dense" not in params["decoder"]
    assert np.isfinite(logits_of(model, params, t5x_outputs)).all()


# ------------------------------------------------------------------------------------
# Legacy T5X (msgpack + TensorStore).
# ------------------------------------------------------------------------------------


def test_legacy_t5x_checkpoint_reproduces_t5x_logits(loaded, t5x_outputs, monkeypatch):
    opened = []
    open_store = tensorstore.open

    def spy(spec, *args, **kwargs):
        opened.append(json.dumps(spec))
        return open_store(spec, *args, **kwargs)

    monkeypatch.setattr(tensorstore, "open", spy)
    model, params = t5_checkpoints.from_pretrained(LEGACY_CHECKPOINT)
    assert model.config == CONFIG
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])
    assert jax.tree.structure(params) == jax.tree.structure(loaded[1])
    # One TensorStore per parameter, none of the optimizer state's.
    assert len(opened) == len(jax.tree.leaves(params))
    assert all("/target." in spec and "state.param_states" not in spec for spec in opened)
    logits = logits_of(model, params, t5x_outputs)
    np.testing.assert_allclose(logits, t5x_outputs["logits"], rtol=1e-5, atol=1e-5)


def edited_legacy(tmp_path, edit):
    """A copy of the legacy fixture whose msgpack `optimizer/target` is changed by `edit`."""
    directory = tmp_path / "checkpoint_0"
    shutil.copytree(LEGACY_CHECKPOINT, directory)
    contents = serialization.msgpack_restore((directory / "checkpoint").read_bytes())
    edit(contents["optimizer"]["target"])
    (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
    return directory


def _add_legacy(target):  # an inline (msgpack) array nobody needs
    target["encoder"]["layers_0"]["attention"]["bias"] = np.zeros(32, np.float32)


def _drop_legacy(target):
    del target["decoder"]["layers_1"]["mlp"]["wo"]


def _reshape_legacy(target):
    spec = target["decoder"]["layers_1"]["self_attention"]["value"]["kernel"]
    spec["metadata"]["shape"] = [32, 25]


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (_add_legacy, ["unused ['target/encoder/layers_0/attention/bias']", "missing []"]),
        (_drop_legacy, ["unused []", "missing ['target/decoder/layers_1/mlp/wo/kernel']"]),
        (
            _reshape_legacy,
            [
                "'target/decoder/layers_1/self_attention/value/kernel' has shape (32, 25)",
                "(32, 24)",
            ],
        ),
    ],
    ids=["extra", "missing", "shape"],
)
@pytest.mark.parametrize("with_shardings", [False, True], ids=["numpy", "sharded"])
def test_legacy_t5x_extra_missing_or_misshaped_tensor_is_an_error(
    tmp_path, edit, fragments, with_shardings, sharded
):
    directory = edited_legacy(tmp_path, edit)
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(directory, shardings=sharded if with_shardings else None)
    assert_one_line_error(excinfo, str(directory), *fragments)


# ------------------------------------------------------------------------------------
# Neither layout.
# ------------------------------------------------------------------------------------


def test_a_directory_of_neither_layout_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(tmp_path)
    assert_one_line_error(excinfo, str(tmp_path), "neither")

    missing = tmp_path / "does_not_exist"
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(missing)
    assert_one_line_error(excinfo, str(missing), "neither")

    (tmp_path / "config.json").write_text("{}")  # no model.safetensors
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(tmp_path)
    assert_one_line_error(excinfo, str(tmp_path), "neither")


def test_a_model_dir_and_a_legacy_checkpoint_without_params_are_errors(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(CHECKPOINT, model_dir / "checkpoint_0")
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(model_dir)
    assert_one_line_error(excinfo, str(model_dir), "checkpoint_<step> sub-directories")

    legacy = tmp_path / "legacy" / "checkpoint_100"
    legacy.mkdir(parents=True)
    (legacy / "checkpoint").write_bytes(serialization.msgpack_serialize({"version": 3}))
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(legacy)
    assert_one_line_error(excinfo, str(legacy), "has no 'optimizer/target'")


# ------------------------------------------------------------------------------------
# Hugging Face.
# ------------------------------------------------------------------------------------


def hf_t5_v1_1_tensor_shapes(c):
    """{name: PyTorch shape} of HF's T5ForConditionalGeneration for a T5 v1.1 config.

    Written from HF's module tree (T5Stack.block[i].layer = [T5LayerSelfAttention,
    (T5LayerCrossAttention,) T5LayerFF]; nn.Linear weights are [out, in]; the
    relative attention table nn.Embedding(num_buckets, num_heads) exists in block 0
    only; no biases; untied lm_head), independently of the library's mapping.
    """
    d, inner, ff = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"]
    shapes = {"shared.weight": (c["vocab_size"], d), "lm_head.weight": (c["vocab_size"], d)}

    def attention(prefix):
        for name in "qkv":
            shapes[f"{prefix}.{name}.weight"] = (inner, d)
        shapes[f"{prefix}.o.weight"] = (d, inner)

    for stack, count in (("encoder", c["num_layers"]), ("decoder", c["num_decoder_layers"])):
        for i in range(count):
            sublayers = ["SelfAttention"] + (["EncDecAttention"] if stack == "decoder" else [])
            for j, attention_name in enumerate(sublayers):
                attention(f"{stack}.block.{i}.layer.{j}.{attention_name}")
                shapes[f"{stack}.block.{i}.layer.{j}.layer_norm.weight"] = (d,)
            ffn = f"{stack}.block.{i}.layer.{len(sublayers)}"
            shapes[f"{ffn}.DenseReluDense.wi_0.weight"] = (ff, d)
            shapes[f"{ffn}.DenseReluDense.wi_1.weight"] = (ff, d)
            shapes[f"{ffn}.DenseReluDense.wo.weight"] = (d, ff)
            shapes[f"{ffn}.layer_norm.weight"] = (d,)
        shapes[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
            c["relative_attention_num_buckets"],
            c["num_heads"],
        )
        shapes[f"{stack}.final_layer_norm.weight"] = (d,)
    return shapes


# An HF config.json for the fixture's shapes, written by hand in HF's field names.
HF_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "vocab_size": 80,
    "d_model": 32,
    "d_kv": 6,
    "d_ff": 48,
    "num_layers": 1,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def hf_numpy_logits(sd, c, encoder_tokens, decoder_inputs, decoder_targets):
    """HF T5ForConditionalGeneration's forward pass (v1.1, untied), in float64 numpy."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    heads, d_kv, eps = c["num_heads"], c["d_kv"], c["layer_norm_epsilon"]
    neg = np.finfo(np.float64).min

    def norm(x, name):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * sd[name]

    def linear(x, name):
        return x @ sd[name].T

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def bucket(relative, bidirectional):  # HF's _relative_position_bucket
        num_buckets, max_distance, result = c["relative_attention_num_buckets"], 128, 0
        if bidirectional:
            num_buckets //= 2
            result = (relative > 0) * num_buckets
            relative = np.abs(relative)
        else:
            relative = -np.minimum(relative, 0)
        max_exact = num_buckets // 2
        scaled = np.log(np.maximum(relative, 1) / max_exact) / math.log(max_distance / max_exact)
        large = max_exact + (scaled * (num_buckets - max_exact)).astype(np.int64)
        large = np.minimum(large, num_buckets - 1)
        return result + np.where(relative < max_exact, relative, large)

    def position_bias(stack, q_len, k_len, bidirectional):
        relative = np.arange(k_len)[None] - np.arange(q_len)[:, None]
        table = sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        return table[bucket(relative, bidirectional)].transpose(2, 0, 1)[None]  # 1,h,q,k

    def attention(x, kv, prefix, bias):
        def split(t):
            return t.reshape(t.shape[0], t.shape[1], heads, d_kv).transpose(0, 2, 1, 3)

        q = split(linear(x, f"{prefix}.q.weight"))
        k = split(linear(kv, f"{prefix}.k.weight"))
        v = split(linear(kv, f"{prefix}.v.weight"))
        scores = q @ k.transpose(0, 1, 3, 2) + bias  # T5: no 1/sqrt(d_kv)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
        return linear(context, f"{prefix}.o.weight")

    def ffn(x, prefix):
        hidden = gelu_new(linear(x, f"{prefix}.wi_0.weight")) * linear(x, f"{prefix}.wi_1.weight")
        return linear(hidden, f"{prefix}.wo.weight")

    emb = sd["shared.weight"]
    enc_keys = np.where(encoder_tokens > 0, 0.0, neg)[:, None, None, :]
    x = emb[encoder_tokens]
    bias = position_bias("encoder", x.shape[1], x.shape[1], True) + enc_keys
    for i in range(c["num_layers"]):
        b = f"encoder.block.{i}.layer"
        h = norm(x, f"{b}.0.layer_norm.weight")
        x = x + attention(h, h, f"{b}.0.SelfAttention", bias)
        x = x + ffn(norm(x, f"{b}.1.layer_norm.weight"), f"{b}.1.DenseReluDense")
    encoded = norm(x, "encoder.final_layer_norm.weight")

    y = emb[decoder_inputs]
    length = y.shape[1]
    causal = np.tril(np.ones((length, length), bool))[None, None]
    dec_keys = (decoder_targets > 0)[:, None, None, :]
    self_bias = position_bias("decoder", length, length, False)
    self_bias = self_bias + np.where(causal & dec_keys, 0.0, neg)
    for i in range(c["num_decoder_layers"]):
        b = f"decoder.block.{i}.layer"
        h = norm(y, f"{b}.0.layer_norm.weight")
        y = y + attention(h, h, f"{b}.0.SelfAttention", self_bias)
        h = norm(y, f"{b}.1.layer_norm.weight")
        y = y + attention(h, encoded, f"{b}.1.EncDecAttention", enc_keys)
        y = y + ffn(norm(y, f"{b}.2.layer_norm.weight"), f"{b}.2.DenseReluDense")
    y = norm(y, "decoder.final_layer_norm.weight")
    return linear(y, "lm_head.weight")


def write_hf_dir(directory, state, config=HF_CONFIG):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(state, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def hf_state(loaded):
    return t5_checkpoints.to_hf_state_dict(loaded[0].config, loaded[1])


def test_hf_mapping_has_hf_names_and_pytorch_shapes(hf_state):
    expected = hf_t5_v1_1_tensor_shapes(HF_CONFIG)
    assert {k: v.shape for k, v in hf_state.items()} == expected
    assert all(v.dtype == np.float32 for v in hf_state.values())
    # The library's own config export agrees with the hand-written one.
    exported = t5_checkpoints.to_hf_config(CONFIG)
    assert {k: exported[k] for k in HF_CONFIG if k in exported} == {
        k: HF_CONFIG[k] for k in exported if k in HF_CONFIG
    }


def test_hf_numpy_forward_on_the_mapped_tensors_reproduces_t5x(hf_state, t5x_outputs):
    logits = hf_numpy_logits(
        hf_state,
        HF_CONFIG,
        t5x_outputs["encoder_input_tokens"],
        t5x_outputs["decoder_input_tokens"],
        t5x_outputs["decoder_target_tokens"],
    )
    real = t5x_outputs["decoder_target_tokens"] > 0  # HF does not mask padded queries
    np.testing.assert_allclose(logits[real], t5x_outputs["logits"][real], rtol=1e-4, atol=1e-4)


def test_hf_directory_loads_and_reproduces_t5x_logits(tmp_path, hf_state, loaded, t5x_outputs):
    model, params = t5_checkpoints.from_pretrained(write_hf_dir(tmp_path / "hf", hf_state))
    assert model.config == CONFIG
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])
    assert jax.tree.structure(params) == jax.tree.structure(loaded[1])
    logits = logits_of(model, params, t5x_outputs)
    np.testing.assert_allclose(logits, t5x_outputs["logits"], rtol=1e-5, atol=1e-5)


def test_hf_persisted_embedding_copies_are_checked_and_dropped(
    tmp_path, hf_state, loaded, monkeypatch
):
    monkeypatch.setattr(t5_checkpoints, "_COMPARE_BYTES", 7 * 32 * 4)  # 7-row blocks of 80
    shared = hf_state["shared.weight"]
    state = dict(hf_state, **{"encoder.embed_tokens.weight": shared.copy()})
    state["decoder.embed_tokens.weight"] = shared.copy()
    _, params = t5_checkpoints.from_pretrained(write_hf_dir(tmp_path / "ok", state))
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])

    state["decoder.embed_tokens.weight"] = shared.copy()
    state["decoder.embed_tokens.weight"][-1, -1] += 1  # in the last, partial block
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(write_hf_dir(tmp_path / "bad", state))
    assert_one_line_error(excinfo, "'decoder.embed_tokens.weight' is not a copy")


def test_hf_tied_config_uses_the_embedding_as_head(tmp_path, hf_state):
    state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    config = dict(HF_CONFIG, tie_word_embeddings=True)
    model, params = t5_checkpoints.from_pretrained(write_hf_dir(tmp_path / "tied", state, config))
    assert model.config.logits_via_embedding
    assert "logits_dense" not in params["decoder"]


EXTRA_HF = "encoder.block.1.layer.0.layer_norm.weight"  # a second encoder block
MISSING_HF = "decoder.block.1.layer.1.EncDecAttention.k.weight"
RESHAPED_HF = "encoder.block.0.layer.0.SelfAttention.o.weight"  # [d_model, inner] in HF


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (
            {EXTRA_HF: np.ones(32, np.float32)},
            [f"unused [{EXTRA_HF!r}]", "missing []"],
        ),
        (
            {MISSING_HF: None},
            ["unused []", f"missing [{MISSING_HF!r}]"],
        ),
        (
            {RESHAPED_HF: np.zeros((24, 32), np.float32)},
            [f"{RESHAPED_HF!r} has shape (24, 32)", "(32, 24)"],
        ),
    ],
    ids=["extra", "missing", "shape"],
)
@pytest.mark.parametrize("with_shardings", [False, True], ids=["numpy", "sharded"])
def test_hf_extra_missing_or_misshaped_tensor_is_an_error(
    tmp_path, hf_state, edit, fragments, with_shardings, sharded
):
    state = {k: v for k, v in {**hf_state, **edit}.items() if v is not None}
    directory = write_hf_dir(tmp_path / "hf", state)
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(directory, shardings=sharded if with_shardings else None)
    assert_one_line_error(excinfo, str(directory / "model.safetensors"), *fragments)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"feed_forward_proj": "relu"}, "feed_forward_proj 'relu'"),
        ({"model_type": "bert"}, "model_type 'bert'"),
        ({"layer_norm_epsilon": 1e-5}, "layer_norm_epsilon"),
    ],
)
def test_hf_unsupported_config_is_an_error(tmp_path, hf_state, change, fragment):
    directory = write_hf_dir(tmp_path / "hf", hf_state, dict(HF_CONFIG, **change))
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(directory)
    assert_one_line_error(excinfo, str(directory / "config.json"), fragment)


def test_t5_from_pretrained_is_the_checkpoint_reader(loaded, sharded):
    model, params = t5.from_pretrained(CHECKPOINT)
    assert model.config == loaded[0].config
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])
    _, params = t5.from_pretrained(CHECKPOINT, shardings=sharded(CONFIG))  # a tree
    assert jax.tree.map(lambda a: a.sharding, params) == sharded(CONFIG)


# ------------------------------------------------------------------------------------
# Sharded loading: each parameter read slice by slice straight into its sharding.
# ------------------------------------------------------------------------------------


class SpySafetensors:
    """A `safe_open` file recording the bytes of each `get_slice(name)[index]` read.

    It has no `get_tensor`: a whole-tensor read fails.
    """

    def __init__(self, file, reads):
        self._file, self._reads = file, reads

    def keys(self):
        return self._file.keys()

    def get_slice(self, name):
        return SpySlice(self._file.get_slice(name), name, self._reads)


class SpySlice:
    def __init__(self, tensor_slice, name, reads):
        self._slice, self._name, self._reads = tensor_slice, name, reads

    def get_shape(self):
        return self._slice.get_shape()

    def __getitem__(self, index):
        value = self._slice[index]
        self._reads.append((self._name, value.nbytes))
        return value


class SpyStore:
    """A TensorStore recording the bytes of each indexed read; it cannot be read whole."""

    def __init__(self, store, name, reads):
        self._store, self._name, self._reads = store, name, reads

    def result(self):  # ts.open(...) returns a future
        return SpyStore(self._store.result(), self._name, self._reads)

    def __getitem__(self, index):
        part = self._store[index]
        self._reads.append((self._name, math.prod(part.shape) * part.dtype.numpy_dtype.itemsize))
        return part


def stored_name(spec_json):
    """'target.encoder.layers_0...' (T5X's array name) of a TensorStore spec (JSON text)."""
    return re.search(r'"path": "[^"]*?((?:target|state)\.[^"/]*)', spec_json).group(1)


def spy_reads(layout, monkeypatch, tmp_path, hf_state):
    """(checkpoint path, reads): each array read appends (parameter path, bytes) to reads."""
    reads = []
    if layout == "hf":
        names = {name: t.path for name, t in t5_checkpoints.hf_tensor_map(CONFIG).items()}
        real_open = t5_checkpoints.safe_open

        @contextlib.contextmanager
        def spy_open(path, framework):
            with real_open(path, framework=framework) as file:
                yield SpySafetensors(file, reads)

        monkeypatch.setattr(t5_checkpoints, "safe_open", spy_open)
        path = write_hf_dir(tmp_path / "hf", hf_state)
    elif layout == "legacy":
        names = None
        real_open = tensorstore.open

        def spy_open(spec, *args, **kwargs):
            name = stored_name(json.dumps(spec))
            return SpyStore(real_open(spec, *args, **kwargs), name, reads)

        monkeypatch.setattr(tensorstore, "open", spy_open)
        path = LEGACY_CHECKPOINT
    else:
        names = None
        real_read = orbax_serialization._read_shard

        async def spy_read(t, **kwargs):
            shard = await real_read(t, **kwargs)
            reads.append((stored_name(json.dumps(t.spec().to_json())), shard.nbytes))
            return shard

        monkeypatch.setattr(orbax_serialization, "_read_shard", spy_read)
        path = CHECKPOINT
    return path, reads, names


def distinct_slices(array):
    indices = array.sharding.devices_indices_map(array.shape).values()
    return {tuple((s.start, s.stop) for s in index) for index in indices}


@pytest.mark.parametrize("layout", ["t5x", "legacy", "hf"])
def test_sharded_load_reads_one_slice_per_shard_into_the_shardings(
    layout, loaded, hf_state, sharded, tmp_path, monkeypatch
):
    path, reads, names = spy_reads(layout, monkeypatch, tmp_path, hf_state)
    start = time.perf_counter()
    model, params = t5_checkpoints.from_pretrained(path, shardings=sharded)
    seconds = time.perf_counter() - start
    assert model.config == CONFIG
    by_path = collections.defaultdict(list)
    for name, nbytes in reads:  # no optimizer state: only 'target.' arrays (or HF names)
        by_path[names[name] if names else tuple(name.split(".")[1:])].append(nbytes)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert set(by_path) == {tuple(k.key for k in p) for p, _ in leaves}
    model_sharded = 0
    for (p, array), want, sharding in zip(
        leaves, jax.tree.leaves(loaded[1]), jax.tree.leaves(sharded(CONFIG)), strict=True
    ):
        assert isinstance(array, jax.Array) and array.sharding == sharding
        np.testing.assert_array_equal(np.asarray(array).view(np.uint32), want.view(np.uint32))
        shard_bytes = math.prod(sharding.shard_shape(array.shape)) * 4
        # One read per distinct device slice (replicas share it), each of one shard.
        assert by_path[tuple(k.key for k in p)] == [shard_bytes] * len(distinct_slices(array))
        if not sharding.is_fully_replicated:
            assert shard_bytes == array.nbytes // 2
            model_sharded += 1
    assert model_sharded == 33  # all but the 10 layer norms (of 43)
    print(f"{layout}: {len(reads)} reads, {sum(n for _, n in reads)} bytes, {seconds:.2f} s")


def random_hf_dir(directory, config, seed=0):
    """An HF directory of random float32 parameters of `config`; returns the params."""
    rng = np.random.default_rng(seed)
    params = {}
    for path, shape in t5_checkpoints.abstract_params(config).items():
        t5_checkpoints.tensor_matching.set_path(
            params, path, rng.standard_normal(shape, np.float32)
        )
    state = t5_checkpoints.to_hf_state_dict(config, params)
    write_hf_dir(directory, state, t5_checkpoints.to_hf_config(config))
    return params


def test_sharded_hf_load_allocates_at_most_one_shard_per_read(tmp_path, sharded, monkeypatch):
    """tracemalloc (numpy and safetensors allocate through it) around every read."""
    config = dataclasses.replace(
        CONFIG, vocab_size=1024, emb_dim=128, head_dim=32, mlp_dim=512, num_decoder_layers=1
    )
    expected = random_hf_dir(tmp_path / "hf", config)
    measured = []
    make_array = jax.make_array_from_callback

    def measuring(shape, sharding, read):
        def measured_read(index):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            value = read(index)
            peak = tracemalloc.get_traced_memory()[1] - before
            measured.append((math.prod(shape) * 4, value.nbytes, peak))
            return value

        return make_array(shape, sharding, measured_read)

    monkeypatch.setattr(jax, "make_array_from_callback", measuring)
    tracemalloc.start()
    try:
        _, params = t5_checkpoints.from_pretrained(tmp_path / "hf", shardings=sharded)
    finally:
        tracemalloc.stop()
    jax.tree.map(
        lambda got, want: np.testing.assert_array_equal(np.asarray(got), want), params, expected
    )
    # One call per device (one for a replicated parameter); replicas hit the first read.
    calls = [1 if a.sharding.is_fully_replicated else 8 for a in jax.tree.leaves(params)]
    assert len(measured) == sum(calls)
    slack = 4096  # Python objects of the call
    assert all(peak <= shard + slack for _, shard, peak in measured)
    halves = [(full, peak) for full, shard, peak in measured if shard < full]
    assert halves and all(peak < full // 2 + slack for full, peak in halves)
    largest = max(peak for *_, peak in measured)
    print(f"largest read allocation {largest} B; largest tensor {max(measured)[0]} B")


def test_shardings_of_another_model_or_a_rejecting_function_fail_before_any_read(
    sharded, monkeypatch
):
    restores = []
    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", lambda *a, **k: restores.append(a))
    other = sharded(dataclasses.replace(CONFIG, num_decoder_layers=1))
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(CHECKPOINT, shardings=other)
    assert_one_line_error(
        excinfo, CHECKPOINT, "shardings are not those", "extra []", "missing ['decoder/layers_1/"
    )

    def reject(config):
        raise ValueError(f"another model: num_decoder_layers={config.num_decoder_layers}")

    with pytest.raises(ValueError, match="num_decoder_layers=2"):
        t5_checkpoints.from_pretrained(CHECKPOINT, shardings=reject)
    assert not restores


def test_shardings_function_returning_none_loads_numpy(loaded):
    seen = []
    _, params = t5_checkpoints.from_pretrained(CHECKPOINT, shardings=lambda c: seen.append(c))
    assert seen == [CONFIG]
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(params))


def test_t5_1_1_xl_params_fit_a_2x4_mesh_a_quarter_per_device():
    """Shapes and shardings only (no compile, nothing allocated)."""
    config = t5.t5_1_1_config("xl")
    partitioner = partitioning.Partitioner(4, t5.DEFAULT_LOGICAL_AXIS_RULES)
    abstract = jax.eval_shape(functools.partial(t5.init_variables, config), jax.random.key(0))
    shapes = [leaf.shape for leaf in jax.tree.leaves(nn.meta.unbox(abstract["params"]))]
    shardings = jax.tree.leaves(partitioner.shardings(abstract["params"]))
    full = [math.prod(shape) * 4 for shape in shapes]
    shard = [
        math.prod(s.shard_shape(shape)) * 4 for s, shape in zip(shardings, shapes, strict=True)
    ]
    replicated = sum(f for f, s in zip(full, shard) if f == s)
    total, per_device = sum(full), sum(shard)
    mb = [f"{n / 1e6:.1f} MB" for n in (per_device, max(shard), max(full), replicated)]
    print(
        f"XL {total / 1e9:.2f} GB: per device {mb[0]}, largest shard {mb[1]} of {mb[2]}, "
        f"replicated {mb[3]}"
    )
    assert 11e9 < total < 12e9  # 2.85 B float32 parameters
    assert per_device == (total - replicated) // 4 + replicated
    assert replicated < total / 1000  # layer norms and position biases
    assert max(shard) == max(full) // 4
