"""Models as pure functions of a params dict, and what they return: `ModelOutputs`.

An nnx module is taken apart once into a graph definition and a template state (`PureModel`);
the step, the teacher and evaluation then apply it to pure dicts of arrays, inside jit or grad.
A model returns its outputs, not logits: the final hidden states and the output head (and, on
request, every layer's states), so a loss may project onto the vocabulary all at once
(`ModelOutputs.logits`) or chunk by chunk.

Any module works as long as `module(tokens, positions, segment_ids, with_layers)` returns the
final hidden states [batch, seq, d] (and, with `with_layers`, the layers' states) and
`module.head_vd()` the output head [vocab, d].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from kd_jax.config import ModelConfig
from kd_jax.models.transformer import Transformer

Params = Any
Batch = dict[str, jax.Array]


@struct.dataclass
class ModelOutputs:
    """What a model computes for a batch, before the vocabulary projection."""

    hidden_btd: jax.Array  # final-normed hidden states
    head_vd: jax.Array  # the output head (the embedding when tied), fake-quantized if asked
    layers_lbtd: jax.Array | None = None  # each layer's output, on request
    # the attention log-probabilities of the requested layers [k, b, n, t, t] (-inf: masked)
    attention_kbnts: jax.Array | None = None

    def logits(self) -> jax.Array:
        """[batch, tokens, vocab] logits, float32."""
        return logits_btv(self.hidden_btd, self.head_vd)


def logits_btv(hidden_btd: jax.Array, head_vd: jax.Array) -> jax.Array:
    """Project hidden states onto the vocabulary; float32 accumulation and output."""
    return jnp.einsum("btd,vd->btv", hidden_btd, head_vd.astype(hidden_btd.dtype),
                      preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class PureModel:
    """An nnx module taken apart: a graph definition and a template state, applied to pure
    params."""

    graphdef: nnx.GraphDef
    template: nnx.State

    def apply(self, params: Params, batch: Batch, with_layers: bool = False,
              activation_sharding: Any = None,
              attention_layers: tuple[int, ...] = (),
              dropout_key: jax.Array | None = None) -> ModelOutputs:
        """The model's outputs; `activation_sharding` pins the residual stream between layers
        (see `Transformer.__call__`); `attention_layers` asks for those layers' attention
        distributions (`Transformer.attention_logprobs`), from the same forward pass;
        `dropout_key` (training steps) drops the LoRA adapters' inputs."""
        module = bind(self.graphdef, self.template, params)
        args = batch["tokens"], batch["positions"], batch["segment_ids"]
        if with_layers or attention_layers:
            hidden_btd, layers_lbtd = module(*args, with_layers=True,
                                             activation_sharding=activation_sharding,
                                             dropout_key=dropout_key)
            attention_kbnts = (module.attention_logprobs(*args, layers_lbtd, attention_layers)
                               if attention_layers else None)
            return ModelOutputs(hidden_btd, module.head_vd(),
                                layers_lbtd if with_layers else None, attention_kbnts)
        hidden_btd = module(*args, activation_sharding=activation_sharding,
                            dropout_key=dropout_key)
        return ModelOutputs(hidden_btd, module.head_vd())

    def logits(self, params: Params, batch: Batch) -> jax.Array:
        return self.apply(params, batch).logits()


def init_model(cfg: ModelConfig) -> tuple[PureModel, Params]:
    """Build the Transformer described by `cfg`, initialized from `cfg.seed`."""
    graphdef, template, params = split_params(Transformer(cfg, rngs=nnx.Rngs(cfg.seed)))
    return PureModel(graphdef, template), params


def init_params(cfg: ModelConfig) -> Params:
    """Only the parameters of `init_model`: for building them inside a jit, straight into their
    shardings (every process computes the same values, each keeping its own shards)."""
    return split_params(Transformer(cfg, rngs=nnx.Rngs(cfg.seed)))[2]


def abstract_model(cfg: ModelConfig) -> tuple[PureModel, Params]:
    """Like `init_model`, but with shape/dtype placeholders instead of arrays (for restoring)."""
    module = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(cfg.seed)))
    graphdef, template, params = split_params(module)
    return PureModel(graphdef, template), params


def count_params(params_tree: Any) -> int:
    """Number of scalars in a tree of arrays (pure dict, nnx.State, or ShapeDtypeStructs)."""
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params_tree)))


def logical_axes(state: nnx.State) -> dict:
    """The `logical_axes` metadata of each parameter, shaped like `nnx.to_pure_dict(state)`.

    Leaves are tuples (one name per dimension); walk it with
    `jax.tree.map(f, params, axes, is_leaf=lambda x: isinstance(x, tuple))` or by path.
    """
    tree: dict = {}
    for path, variable in nnx.to_flat_state(state):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"parameter {'/'.join(map(str, path))} has no logical_axes")
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(axes)
    return tree


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """(graphdef, template state, pure params dict) for a module whose state is all nnx.Param."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, state, nnx.to_pure_dict(state)


def bind(graphdef: nnx.GraphDef, template_state: nnx.State, params: dict) -> nnx.Module:
    """Rebuild the module with `params` (a pure dict, possibly tracers) in place of its weights.

    The template is copied first, so it is never mutated and this is safe inside jit or grad.
    """
    state = jax.tree.map(lambda value: value, template_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
