"""Backend dispatch: names, the env override, "auto" on CPU, errors that say why."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt_fast import backends
from lopt_fast.backends import BackendUnavailableError, resolve_backend
from lopt_fast.learned import AdafacMLPLOpt
from tests.helpers import run_python

ON_CPU = jax.default_backend() == "cpu"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU choice")
def test_auto_is_reference_on_cpu():
    assert resolve_backend("auto").name == "reference"
    assert backends.auto_backend_name() == "reference"


def test_auto_on_nvidia_gpu_prefers_pallas_then_triton(monkeypatch):
    """The GPU choice, decided on this machine by pretending the platform is CUDA."""
    assert backends._import_error("json") is None
    assert "does not import" in backends._import_error("lopt_fast.no_such_module")
    monkeypatch.setattr(backends, "_platform", lambda: "cuda")
    real_find_spec = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name: object() if name in ("triton", "jax_triton")
                        else real_find_spec(name))
    broken = set()
    monkeypatch.setattr(backends, "_import_error",
                        lambda module: f"{module}: ImportError" if module in broken else None)
    assert backends.auto_backend_name() == "pallas"
    # A JAX without Pallas' Triton lowering: auto takes the Triton kernels, and an explicit
    # "pallas" says why it cannot run.
    broken.add("jax.experimental.pallas.triton")
    assert backends.auto_backend_name() == "triton"
    with pytest.raises(BackendUnavailableError, match="pallas.triton: ImportError"):
        resolve_backend("pallas")
    # jax-triton installed but broken (e.g. built against another jax) too: the reference.
    broken.add("jax_triton")
    assert backends.auto_backend_name() == "reference"
    with pytest.raises(BackendUnavailableError, match="jax_triton: ImportError"):
        resolve_backend("triton")
    broken.clear()
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name: None if name == "jax_triton" else real_find_spec(name))
    assert "jax-triton" in backends._unavailable_reason("triton")
    assert backends.auto_backend_name() == "pallas"


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU choice")
def test_explicit_pallas_on_cpu_runs_interpreted():
    with pytest.warns(UserWarning, match="Pallas' interpreter"):
        b = resolve_backend("pallas")
    assert b.name == "pallas-interpret"
    # no mlp_precision: the kernels' own default, set in one place (`pallas_update`)
    assert b.update.keywords == {"interpret": True, "in_place": True}
    assert "pallas" in backends.available_backends()
    # in_place and mlp_precision reach the kernels from opt_fn (and so from as_optax's
    # keyword arguments); the fp16 operands of "tf32_fp16" are in the traced step.
    lopt = AdafacMLPLOpt(hidden_size=4)
    theta = lopt.init(jax.random.key(0))
    opt = lopt.opt_fn(theta, backend="pallas", in_place=False, mlp_precision="tf32_fp16")
    assert opt.backend.update.keywords == {"interpret": True, "in_place": False,
                                           "mlp_precision": "tf32_fp16"}
    tx = lopt.as_optax(theta, num_steps=10, backend="pallas", mlp_precision="tf32_fp16")
    params = {"w": jnp.ones((3, 5)), "b": jnp.ones((5,))}
    jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
    assert "f16[" in jaxpr.replace("bf16[", ""), "fp16 operands missing from the step"


def test_reference_dispatch_and_the_cli_parser_do_not_load_pallas():
    """Validating mlp_precision reads `lopt_fast.pallas.blocks`; the kernels and Pallas'
    lowering load only when a kernel backend is made."""
    out = run_python(["-c", "import sys\n"
                      "from lopt_fast.backends import resolve_backend\n"
                      "from lopt_fast.cli import build_parser\n"
                      "resolve_backend('reference', mlp_precision='bf16')\n"
                      "build_parser()\n"
                      "print(sorted(m for m in sys.modules if 'pallas' in m\n"
                      "             and m.startswith(('lopt_fast', 'jax.experimental'))))"],
                     "imports")
    assert out.strip() == "['lopt_fast.pallas', 'lopt_fast.pallas.blocks']", out


def test_unknown_mlp_precision_lists_choices():
    lopt = AdafacMLPLOpt(hidden_size=4)
    with pytest.raises(ValueError, match="'fp8' is not one of tf32, ieee, bf16, tf32_fp16"):
        lopt.opt_fn(lopt.init(jax.random.key(0)), backend="reference", mlp_precision="fp8")


@pytest.mark.skipif(not ON_CPU, reason="no GPU: triton cannot run")
def test_triton_without_gpu_raises_with_reason():
    with pytest.raises(BackendUnavailableError, match="NVIDIA GPU"):
        resolve_backend("triton")
    assert "triton" not in backends.available_backends()


def test_env_overrides_argument(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert resolve_backend("pallas").name == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=r"\$LOPT_FAST_BACKEND='nonsense'"):
        resolve_backend("auto")


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="auto, reference, pallas, triton"):
        resolve_backend("cuda")


@pytest.mark.skipif(not ON_CPU, reason="interpret-mode run")
def test_opt_fn_and_optax_bridge_route_to_pallas():
    """One step through `opt_fn(backend="pallas")` and `as_optax(backend=...)` equals
    the reference backend (same non-finite skip logic around both)."""
    lopt = AdafacMLPLOpt(hidden_size=4, exp_mult=0.3, step_mult=0.01)
    theta = lopt.init(jax.random.key(1))
    rng = np.random.default_rng()
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    grad = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    outs = {}
    for name in ("reference", "pallas"):
        opt = lopt.opt_fn(theta, backend=name)
        state = jax.jit(opt.update)(opt.init(params, num_steps=10), grad)
        outs[name] = opt.get_params(state)
        assert int(state.iteration) == 1
    tx = lopt.as_optax(theta, num_steps=10, backend="pallas")
    upd, _ = jax.jit(tx.update)(grad, tx.init(params), params)
    for k in params:
        np.testing.assert_allclose(outs["pallas"][k], outs["reference"][k], rtol=1e-5, atol=1e-6,
                                   err_msg=f"opt_fn {k} shape={params[k].shape}")
        np.testing.assert_allclose(params[k] + upd[k], outs["reference"][k], rtol=1e-5, atol=1e-6,
                                   err_msg=f"as_optax {k} shape={params[k].shape}")


@pytest.mark.filterwarnings("ignore:backend 'pallas' on CPU")
def test_kernel_options_reach_the_kernel_and_unknown_ones_raise():
    """`kernel_options` from `opt_fn` / `as_optax` reach `pallas_update` (its keywords, and a
    step equal to the direct call with the same options); names the update does not take
    raise; the reference ignores them."""
    from lopt_fast.pallas import BlockSizes, pallas_update

    lopt = AdafacMLPLOpt(hidden_size=4)
    theta = lopt.init(jax.random.key(2))
    rng = np.random.default_rng()
    params = {"w": jnp.asarray(rng.normal(size=(6, 40)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(40,)), jnp.float32)}
    grad = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    options = {"layer1": "dot_all", "blocks": BlockSizes(rows=2, cols=16),
               "tile_order": "columns"}
    opt = lopt.opt_fn(theta, backend="pallas", mlp_precision="ieee", kernel_options=options)
    assert {k: opt.backend.update.keywords[k] for k in options} == options
    state = opt.init(params, num_steps=10)
    got = opt.get_params(jax.jit(opt.update)(state, grad))
    direct, _ = jax.jit(lambda s, g: pallas_update(lopt, theta, s, g, mlp_precision="ieee",
                                                   **options))(state, grad)
    tx = lopt.as_optax(theta, num_steps=10, backend="pallas", mlp_precision="ieee",
                       kernel_options=options)
    upd, _ = jax.jit(tx.update)(grad, tx.init(params), params)
    for k in params:
        np.testing.assert_array_equal(got[k], direct[k], err_msg=k)
        np.testing.assert_allclose(params[k] + upd[k], direct[k], rtol=1e-6, atol=1e-6,
                                   err_msg=k)

    with pytest.raises(ValueError, match=r"'persistent' are not options of the 'pallas' "
                                         r"backend's update; it takes .*layer1"):
        lopt.opt_fn(theta, backend="pallas", kernel_options={"persistent": True})
    with pytest.raises(ValueError, match="'in_place' are not options"):
        resolve_backend("pallas", kernel_options={"in_place": False})
    assert resolve_backend("reference", kernel_options={"layer1": "dot_all"}).name == "reference"


@pytest.mark.skipif(ON_CPU, reason="the compiled in-place kernels need a GPU")
@pytest.mark.parametrize("backend", ["pallas", "triton"])
def test_donated_state_is_updated_in_place(backend):
    """With the state donated, the fused step writes p, mom and rms into the donated
    buffers (the apply kernels alias them to their outputs): the outputs reuse the state's
    memory, no temporary copy of it is made, and three in-place steps give what three
    steps on fresh buffers give (a ragged matrix and a packed vector included)."""
    if backend not in backends.available_backends():
        pytest.skip(f"{backend} is not available here")
    lopt = AdafacMLPLOpt(hidden_size=32)
    opt = lopt.opt_fn(lopt.init(jax.random.key(0)), backend=backend)
    rng = np.random.default_rng(0)
    shapes = {"w": (1024, 1536), "b": (1536,), "ragged": (130, 290)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    state = opt.init(params, num_steps=10)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    update_donated = jax.jit(opt.update, donate_argnums=0)
    memory = update_donated.lower(state, params).compile().memory_analysis()
    assert memory.alias_size_in_bytes >= 0.9 * state_bytes, memory
    assert memory.temp_size_in_bytes < 0.25 * state_bytes, memory

    kept, donated = state, jax.tree.map(jnp.copy, state)
    update = jax.jit(lopt.opt_fn(lopt.init(jax.random.key(0)), backend=backend,
                                 in_place=False).update)
    for _ in range(3):
        grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
        kept, donated = update(kept, grads), update_donated(donated, grads)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(donated), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(ON_CPU, reason="the compiled kernels need a GPU")
@pytest.mark.parametrize("backend", ["pallas", "triton"])
def test_copies_only_where_in_place_does_not_match_donation(backend):
    """XLA copies p, mom and rms of each factored tensor before an in-place step whose state
    is kept (not donated), and after a fresh-output step whose state is donated; matched,
    the step copies nothing (`profiling/xla_kernels.py` shows the same on an H100 compiled
    without one)."""
    if backend not in backends.available_backends():
        pytest.skip(f"{backend} is not available here")
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "profiling"))
    from xla_kernels import entry_kernels

    lopt = AdafacMLPLOpt(hidden_size=32)
    theta = lopt.init(jax.random.key(0))
    params = {"w": jnp.ones((256, 384)), "b": jnp.ones((384,))}
    state = lopt.opt_fn(theta, backend="reference").init(params, num_steps=10)
    for in_place in (True, False):
        update = lopt.opt_fn(theta, backend=backend, in_place=in_place).update
        for donate in (True, False):
            text = jax.jit(update, donate_argnums=0 if donate else ()).lower(
                state, params).compile().as_text()
            copies = [k for k in entry_kernels(text) if k.kind == "copy" and not k.empty
                      and ("256,384" in k.shape or "384,256" in k.shape)]
            expected = 0 if in_place == donate else 3
            assert len(copies) == expected, (in_place, donate, copies)
