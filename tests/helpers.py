"""Shared test inputs."""

import jax


def random_theta(lopt, key):
    """A theta with random (not the init's zero) decays and biases so every input of the
    MLP matters."""
    theta = lopt.init(key)
    keys = iter(jax.random.split(jax.random.fold_in(key, 1), 16))
    theta["momentum_decays"] = 0.05 * jax.random.normal(next(keys), (3,))
    theta["rms_decays"] = 0.05 * jax.random.normal(next(keys), (1,))
    theta["adafactor_decays"] = 0.05 * jax.random.normal(next(keys), (3,))
    nn = theta["nn"]["~"]
    for k in list(nn):
        if k.startswith("b"):
            nn[k] = 0.1 * jax.random.normal(next(keys), nn[k].shape)
    return theta
