"""Tests of sam_jax.models.t5_checkpoints.from_pretrained (T5X Orbax and HF T5 layouts).

The T5X fixtures (tests/data/t5x_tiny, see its README.txt: an Orbax checkpoint and a
legacy msgpack + TensorStore one of the same parameters) were written by T5X itself
(commit cc342d41), with T5X's logits on three inputs; T5X is not needed here. The HF
directory is built in tmp_path from the same parameters with our mapping, which is
checked independently: against the tensor names and PyTorch shapes of HF's
`T5ForConditionalGeneration` (T5 v1.1, gated-GELU), and by a plain numpy forward
pass written from HF's T5 definition that must reproduce T5X's logits.
"""

import functools
import json
import math
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore
from etils import epath
from flax import linen as nn
from flax import serialization
from safetensors.numpy import save_file

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
def test_t5x_extra_missing_or_misshaped_tensor_is_an_error(loaded, tmp_path, edit, fragments):
    path = write_t5x_checkpoint(str(tmp_path / "checkpoint_1"), edited(loaded[1], edit))
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(path)
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
def test_legacy_t5x_extra_missing_or_misshaped_tensor_is_an_error(tmp_path, edit, fragments):
    directory = edited_legacy(tmp_path, edit)
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(directory)
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


def test_hf_persisted_embedding_copies_are_checked_and_dropped(tmp_path, hf_state, loaded):
    shared = hf_state["shared.weight"]
    state = dict(hf_state, **{"encoder.embed_tokens.weight": shared.copy()})
    state["decoder.embed_tokens.weight"] = shared.copy()
    _, params = t5_checkpoints.from_pretrained(write_hf_dir(tmp_path / "ok", state))
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])

    state["decoder.embed_tokens.weight"] = shared + 1
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
def test_hf_extra_missing_or_misshaped_tensor_is_an_error(tmp_path, hf_state, edit, fragments):
    state = {k: v for k, v in {**hf_state, **edit}.items() if v is not None}
    directory = write_hf_dir(tmp_path / "hf", state)
    with pytest.raises(ValueError) as excinfo:
        t5_checkpoints.from_pretrained(directory)
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


def test_t5_from_pretrained_is_the_checkpoint_reader():
    model, params = t5.from_pretrained(CHECKPOINT)
    expected_model, expected = t5_checkpoints.from_pretrained(CHECKPOINT)
    assert model.config == expected_model.config
    jax.tree.map(np.testing.assert_array_equal, params, expected)
