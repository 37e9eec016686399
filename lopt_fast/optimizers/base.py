"""The `Optimizer` interface shared by hand-designed and learned optimizers.

It mirrors learned_optimization's `optimizers.base.Optimizer`: the optimizer state
*contains* the parameters, so one `update` call is a whole training step.

    opt = Adam(1e-3)
    state = opt.init(params, num_steps=200)
    state = opt.update(state, grad, loss=loss)
    params = opt.get_params(state)
"""

from __future__ import annotations

from typing import Any

import jax

Params = Any
ModelState = Any
OptState = Any


class Optimizer:
    """Base class: `init`, `update` and `get_params` over an arbitrary pytree.

    Subclasses implement `init` and `update`; their states must expose the
    current parameters as a `params` attribute (and model state as `state`).
    """

    name: str = "Optimizer"

    def init(
        self,
        params: Params,
        model_state: ModelState | None = None,
        num_steps: int | None = None,
        key: jax.Array | None = None,
    ) -> OptState:
        raise NotImplementedError

    def update(
        self,
        opt_state: OptState,
        grad: Params,
        loss: jax.Array | None = None,
        model_state: ModelState | None = None,
        key: jax.Array | None = None,
        **kwargs: Any,
    ) -> OptState:
        raise NotImplementedError

    def get_params(self, opt_state: OptState) -> Params:
        return opt_state.params

    def get_state(self, opt_state: OptState) -> ModelState:
        return opt_state.state

    def __repr__(self) -> str:
        return self.name


def check_same_structure(params: Params, grad: Params, what: str = "grad") -> None:
    """Raise a clear error when `grad` is not shaped like `params`.

    Runs at trace time (shapes and tree structure are static), so it costs
    nothing inside jit.
    """
    p_def = jax.tree.structure(params)
    g_def = jax.tree.structure(grad)
    if p_def != g_def:
        raise ValueError(
            f"{what} tree does not match the params tree.\n"
            f"  expected structure: {p_def}\n  received structure: {g_def}"
        )
    p_leaves = jax.tree.leaves_with_path(params)
    g_leaves = jax.tree.leaves(grad)
    for (path, p), g in zip(p_leaves, g_leaves, strict=True):
        if jax.numpy.shape(p) != jax.numpy.shape(g):
            raise ValueError(
                f"{what} leaf {jax.tree_util.keystr(path)} has shape {jax.numpy.shape(g)}, "
                f"expected {jax.numpy.shape(p)} (the param's shape)."
            )
