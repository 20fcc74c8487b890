"""``torch.compile``d models handed to the optimizers.

What happens (torch 2.14, CPU): Dynamo inlines the optimizer's forward hooks (and the
tensor hooks they register on the outputs) into the compiled frame, so when the optimizer is
built *before the compiled model is first called* the statistics are recorded as without
compile, and the run is the uncompiled run up to round-off (``assert_close_runs``): the
``eager`` and ``aot_eager`` backends run the traced graph with the same kernels (though a
backend may reorder or decompose operations), ``inductor`` (needs a C compiler) fuses them
into kernels of its own that round differently (1e-7 on K-FAC's parameters after a few
steps).

But Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``
is True by default): code compiled before the hooks existed is reused after they are added.
A compiled model called once before the optimizer is built (a warm-up or evaluation pass, or
another instance of the same module class compiled earlier in the process) then never runs
the hooks: no statistics (``model.compile()`` in place is not affected: it runs the hooks
outside the compiled frame). The capture notices recorded forward passes in which no layer
hook ran and raises a ``RuntimeError`` naming the fix (build the optimizer before the first
compiled call, or ``torch._dynamo.reset()``) instead of degrading K-FAC to its base SGD.

AdaHessian needs ``create_graph=True``: the ``eager`` backend supports it, the AOT-autograd
backends raise torch's own ``RuntimeError`` (no double backward).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from ._common import (
    ALL,
    HOOKED,
    ROWS_PER_EXAMPLE,
    assert_close_runs,
    batches,
    make_optimizer,
    params_of,
    tiny_model,
    train,
    updates_of,
)


def _dynamo_available() -> bool:
    try:
        import torch._dynamo

        return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _dynamo_available(), reason="torch.compile is unavailable")
STEPS = 3
#: roundings into a statistic over the run: STEPS batches of 8 examples x 16 positions
RUN_N = STEPS * 8 * ROWS_PER_EXAMPLE


def _assert_same_run(plain, compiled) -> None:
    """A compiled run against the plain one from the same initial weights (tiny_model's)."""
    assert_close_runs(compiled, plain, params_of(tiny_model()), dtype=torch.float32, n=RUN_N)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled code is cached per code object across models: every test starts and ends
    with an empty cache (a model compiled without hooks would otherwise leak into the
    next test, see the module docstring)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(name: str, backend: str | None, **kwargs) -> tuple[list, torch.optim.Optimizer]:
    model = tiny_model()
    target = model if backend is None else torch.compile(model, backend=backend)
    opt = make_optimizer(name, target, **kwargs)
    train(target, opt, batches(STEPS))
    return params_of(model), opt


@pytest.mark.parametrize("name", ALL)
def test_compiled_model_is_the_uncompiled_run_with_the_eager_backend(name):
    compiled, opt = _run(name, "eager")
    plain, reference = _run(name, None)
    if name in HOOKED:
        assert updates_of(opt) == updates_of(reference) > 0
        # the compiled model's layers are named as the uncompiled model's (no _orig_mod.)
        assert [layer.name for layer in opt.estimator.layers] == [
            layer.name for layer in reference.estimator.layers
        ]
    _assert_same_run(plain, compiled)


@pytest.mark.parametrize("name", ["kfac", "adafisher"])
def test_compiled_model_with_aot_autograd_is_the_uncompiled_run(name):
    compiled, opt = _run(name, "aot_eager")
    plain, reference = _run(name, None)
    assert updates_of(opt) == updates_of(reference) > 0
    _assert_same_run(plain, compiled)


def test_adahessian_with_aot_autograd_raises_torchs_double_backward_error():
    with pytest.raises(RuntimeError, match="double backward"):
        _run("adahessian", "aot_eager", hessian_every=1)


@pytest.mark.slow  # about 15 s on the 2-core CPU with a cold inductor cache, 2 s warm
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler"
)
def test_compiled_model_with_inductor_matches_the_uncompiled_run():
    compiled, opt = _run("kfac", "inductor")
    plain, reference = _run("kfac", None)
    assert updates_of(opt) == updates_of(reference) > 0
    _assert_same_run(plain, compiled)


def test_in_place_module_compile_after_a_warm_up_call_keeps_the_hooks():
    """``model.compile()`` (in place) compiles the module's forward but runs its hooks
    outside the compiled frame: a warm-up call before the optimizer does no harm."""
    x, y = batches(1)[0]
    model = tiny_model()
    model.compile(backend="eager")
    F.cross_entropy(model(x), y).backward()
    model.zero_grad()
    opt = make_optimizer("kfac", model)
    train(model, opt, batches(STEPS))
    plain, reference = _run("kfac", None)
    assert updates_of(opt) == updates_of(reference) > 0
    _assert_same_run(plain, params_of(model))


@pytest.mark.parametrize("earlier", ["same model", "another model of the same class"])
def test_model_compiled_before_the_optimizer_raises_then_reset_fixes_it(earlier):
    x, y = batches(1)[0]
    model = tiny_model()
    compiled = torch.compile(model, backend="eager")
    warm = compiled if earlier == "same model" else torch.compile(tiny_model(), backend="eager")
    F.cross_entropy(warm(x), y).backward()  # compiled before any hook exists
    opt = make_optimizer("kfac", compiled)
    with pytest.raises(RuntimeError, match=r"torch\.compile.*torch\._dynamo\.reset\(\)"):
        train(compiled, opt, batches(STEPS))
    opt.remove_hooks()
    torch._dynamo.reset()  # the fix the message names
    opt = make_optimizer("kfac", compiled)
    train(compiled, opt, batches(STEPS))
    assert updates_of(opt) > 0
