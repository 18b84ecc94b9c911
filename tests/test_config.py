"""Tests of sam_jax.config: strict gin (unused macros and bindings), binding errors, config diffs.

The gin files here are written by the tests, with configurables registered here, so
that each check is seen on the smallest config that triggers it.
"""

import gin
import pytest

from sam_jax import config


@gin.configurable
def _root(model=None, optimizer=None, steps=0, name=""):
    del model, optimizer, steps, name


@gin.configurable
def _model(width=1, depth=1):
    del width, depth


@gin.configurable
def _adam(lr=0.1):
    del lr


@gin.configurable
def _sgd(lr=0.1):
    del lr


# A run file: _root calls _model and takes an optimizer; _adam's binding is used only when
# the optimizer is _adam.
RUN = """
_root.model = @_model()
_root.optimizer = @_adam
_root.steps = %STEPS
_model.width = %WIDTH
_adam.lr = %LR
STEPS = 10
WIDTH = 4
LR = 0.01
"""


def parse(tmp_path, bindings, text=RUN):
    path = tmp_path / "run.gin"
    path.write_text(text)
    config.parse_gin([str(path)], bindings, search_paths=[str(tmp_path)])
    return str(path)


def check_usage(tmp_path, bindings, text=RUN):
    path = tmp_path / "run.gin"
    path.write_text(text)
    text_ = config.read_gin_text([str(path)], bindings, search_paths=[str(tmp_path)])
    config.check_gin_usage(text_, root="_root")


def test_read_gin_text_applies_overrides_in_order_and_resolves_macros(tmp_path):
    path = tmp_path / "run.gin"
    path.write_text(RUN)
    text = config.read_gin_text([str(path)], ["WIDTH = 8", "_model.depth = %WIDTH"])
    assert text.macros["WIDTH"] == 8 and text.where["WIDTH"] == "--gin.WIDTH"
    assert text.where["_root.steps"] == f"{path}:4"
    assert text.resolved(text.bindings["_model.depth"]) == 8
    assert text.bindings["_root.model"] == config.Reference("_model", True)
    assert repr(text.bindings["_root.optimizer"]) == "@_adam"


def test_a_used_config_passes(tmp_path):
    check_usage(tmp_path, ["LR = 0.5", "_model.depth = 2"])


@pytest.mark.parametrize(
    "bindings, message",
    [
        (["LRR = 0.5"], r"^LRR \(at --gin\.LRR\) is set but nothing uses it\. Did you mean LR\?"),
        (["_sgd.lr = 0.5"], r"^_sgd\.lr \(at --gin\._sgd\.lr\) is bound, but the run never calls"),
        # _adam's binding is unused once the optimizer is _sgd.
        (
            ["_root.optimizer = @_sgd"],
            r"^_adam\.lr \(at .*run\.gin:6\) is bound, but the run never",
        ),
    ],
    ids=["macro_typo", "unreached_configurable", "replaced_optimizer"],
)
def test_unused_macros_and_bindings_are_refused(tmp_path, bindings, message):
    with pytest.raises(config.ConfigError, match=message):
        check_usage(tmp_path, bindings)


def test_a_macro_of_another_project_gin_file_names_that_file(tmp_path):
    """TRAIN_FRACTION is the task files': the error points there, not at a typo."""
    with pytest.raises(config.ConfigError) as error:
        check_usage(tmp_path, ["TRAIN_FRACTION = 0.5"])
    assert error.value.message.endswith(
        "is set but nothing uses it. gin/tasks/benchmark.gin, gin/tasks/demo.gin, "
        "gin/tasks/glue_encoder.gin and gin/tasks/local_tsv.gin use it: is a --gin_file missing?"
    )


def test_a_config_without_root_bindings_asks_for_a_run_file(tmp_path):
    with pytest.raises(config.ConfigError, match=r"Nothing binds _root's arguments: add a run"):
        check_usage(tmp_path, [], text="_model.width = 2\n")


def test_parse_gin_names_binding_mistakes(tmp_path):
    """(Its usage check, against `train`, runs through the CLI in tests/test_train.py.)"""
    for binding, message in (
        ("_root.name = run_1", "--gin._root.name=run_1: strings need quotes: pass "),
        ("_root.name = /tmp/x", "--gin._root.name=/tmp/x: strings need quotes: pass "),
        ("STEPS = ", "--gin.STEPS has no value"),
        ("STEPS = (1,", "malformed gin binding 'STEPS = (1,'"),
    ):
        with pytest.raises(config.ConfigError) as error:
            parse(tmp_path, [binding])
        assert error.value.message.startswith(message), error.value.message
    gin.clear_config()


def test_rewrite_gin_args_refuses_a_name_without_a_value():
    assert config.rewrite_gin_args(["--gin.RHO=0.1", "--gin_file=a.gin"]) == [
        "--gin_bindings=RHO = 0.1",
        "--gin_file=a.gin",
    ]
    for arg in ("--gin.RHO", "--gin.RHO=", "--gin.RHO=  "):
        with pytest.raises(config.ConfigError, match=r"^--gin\.RHO has no value"):
            config.rewrite_gin_args([arg])


def test_config_changes_compare_bindings_with_macros_resolved():
    saved = "SEED = 0\n_root.steps = %SEED\n_root.model = @_model()\n_model.width = 4\n"
    same = "_root.steps = 0\n_root.model = @_model()\n_model.width = 4\n"
    assert config.config_changes(saved, same) == []
    other = "_root.steps = 0\n_root.model = @_model\n_model.depth = 2\n"
    assert config.config_changes(saved, other) == [
        config.ConfigChange("_model.depth", "unset", "2"),
        config.ConfigChange("_model.width", "4", "unset"),
        config.ConfigChange("_root.model", "@_model()", "@_model"),
    ]
    assert str(config.config_changes("A = 1\n_root.steps = %A", "_root.steps = 2")[0]) == (
        "_root.steps: 1 → 2"
    )


def test_defaults_of_the_project_gin_files_may_be_left_unused():
    """`--gin.t5_1_1_config.vocab_size=128` leaves tiny.gin's VOCAB_SIZE unused: not an error.
    The same macro set on the command line is."""
    tiny = f"{config.GIN_DIR}/models/t5_1_1/tiny.gin:11"
    where = {"_root.steps": "--gin._root.steps", "VOCAB_SIZE": tiny}
    text = config.GinText({"_root.steps": 1}, {"VOCAB_SIZE": 1280}, where)
    config.check_gin_usage(text, root="_root")
    text.where["VOCAB_SIZE"] = "--gin.VOCAB_SIZE"
    with pytest.raises(config.ConfigError, match=r"^VOCAB_SIZE \(at --gin\.VOCAB_SIZE\) is set"):
        config.check_gin_usage(text, root="_root")


@pytest.mark.parametrize("name", ["amsgrad", "adagrad", "adafactor", "adamw"])
def test_the_base_optimizers_gin_can_name(name, tmp_path):
    """FSAM's Table 5 bases (AMSGrad, Adagrad) are selectable like AdamW and Adafactor."""
    import optax

    from sam_jax import train  # noqa: F401  (registers `train`)

    config.parse_gin(
        ["runs/finetune.gin", "models/t5_1_1/tiny.gin"],
        [
            f"train.optimizer = @optax.{name}",
            f"MODEL_DIR = '{tmp_path}'",
            "MIXTURE_OR_TASK_NAME = 'demo_mixture'",
            "TRAIN_STEPS = 1",
        ],
    )
    optimizer = gin.query_parameter("train.optimizer")
    assert optimizer.configurable.wrapped is getattr(optax, name)
