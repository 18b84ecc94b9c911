"""Greedy decoding of a T5 model for evaluation.

Targets in fine-tuning evals are short, so there is no key/value cache: step t
re-runs the (teacher-forced) decoder on the prefix generated so far and takes
the argmax at position t. The causal mask makes positions after t irrelevant,
so the whole target length is decoded at a fixed shape inside one
`lax.while_loop`, which stops once every row has produced EOS.

Example::

  tokens = jax.jit(greedy_decode, static_argnums=(0, 3))(model, params, inputs, 16)
  texts = [vocabulary.decode(row.tolist()) for row in strip_after_eos(tokens)]
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.models import t5

EOS_ID = 1  # T5 vocabularies: 0 padding, 1 EOS.


def greedy_decode(
    model: t5.Transformer,
    params,
    encoder_input_tokens: jax.Array,
    target_length: int,
    *,
    eos_id: int = EOS_ID,
    num_valid_ids: int | None = None,
) -> jax.Array:
    """Greedy (argmax) decoding, without dropout.

    Args:
      model: the `t5.Transformer`.
      params: its (unboxed) parameters.
      encoder_input_tokens: int [batch, input_length]; 0 is padding.
      target_length: the number of tokens to decode.
      eos_id: the end-of-sequence id; a row stops at its first EOS.
      num_valid_ids: if given, only ids below it are predicted (a model whose
        vocabulary is padded beyond the task's, e.g. 32128 for T5's 32100 ids).

    Returns:
      int32 [batch, target_length]: each row's tokens up to and including its
      EOS, then zeros.
    """
    batch_size = encoder_input_tokens.shape[0]
    variables = {"params": params}
    encoded = model.apply(
        variables, encoder_input_tokens, enable_dropout=False, method=t5.Transformer.encode
    )
    no_padding = jnp.ones((batch_size, target_length), jnp.int32)

    def next_tokens(outputs, position):
        decoder_input_tokens = jnp.pad(outputs[:, :-1], ((0, 0), (1, 0)))
        logits = model.apply(
            variables,
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            no_padding,
            enable_dropout=False,
            method=t5.Transformer.decode,
        )
        logits = jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False)
        if num_valid_ids is not None:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < num_valid_ids, logits, -jnp.inf)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def body(carry):
        position, outputs, finished = carry
        tokens = jnp.where(finished, 0, next_tokens(outputs, position))
        outputs = jax.lax.dynamic_update_index_in_dim(outputs, tokens, position, axis=1)
        return position + 1, outputs, finished | (tokens == eos_id)

    def not_done(carry):
        position, _, finished = carry
        return (position < target_length) & ~jnp.all(finished)

    start = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((batch_size, target_length), jnp.int32),
        jnp.zeros((batch_size,), jnp.bool_),
    )
    _, outputs, _ = jax.lax.while_loop(not_done, body, start)
    return outputs


def strip_after_eos(tokens: np.ndarray, eos_id: int = EOS_ID) -> list[Sequence[int]]:
    """Each row's ids before its first EOS (padding 0s dropped), as lists."""
    rows = []
    for row in np.asarray(tokens):
        ids = row.tolist()
        if eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        rows.append([i for i in ids if i != 0])
    return rows
