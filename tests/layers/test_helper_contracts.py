"""The two helper families keep to their contracts, and the code around them says so.

Every registered helper is a :class:`KroneckerHelper` or a :class:`BlockHelper` (never
both, never neither); estimators tell them apart with ``isinstance``, not with strings or
``hasattr``; and the package imports every dependency it declares.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from secondorder.layers import (
    BatchNormHelper,
    BlockHelper,
    Conv2dHelper,
    EmbeddingHelper,
    KroneckerHelper,
    LayerHelper,
    LinearHelper,
    register_layer_helper,
    registered_helpers,
)

from ..helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]

# Capability branches that the helper classes replace.
# a helper's kind read as a string (``FactorLayout.kind``, a factor's storage, is another thing)
_FORBIDDEN = (
    "hasattr(layer",
    'layer.kind == "blocks"',
    'layer.kind == "kronecker"',
    'layer.kind != "kronecker"',
    'helper.kind == "blocks"',
    "getattr(layer,",
)
# left where they are, with the reason (none today)
_PENDING: dict[tuple[str, str], int] = {}
# distribution name -> import name, where they differ
_IMPORT_NAMES = {"scikit-learn": "sklearn", "pyyaml": "yaml"}


@pytest.mark.parametrize("helper", registered_helpers(), ids=lambda h: h.__name__)
def test_every_registered_helper_is_of_exactly_one_family(helper):
    assert issubclass(helper, KroneckerHelper) != issubclass(helper, BlockHelper)


@pytest.mark.parametrize("helper", registered_helpers(), ids=lambda h: h.__name__)
def test_block_helpers_have_no_kronecker_members(helper):
    kronecker_only = ("a_rows", "g_rows", "a_dim", "g_dim", "weight_matrix_shape", "grad_matrix")
    has = [name for name in kronecker_only if hasattr(helper, name)]
    if issubclass(helper, BlockHelper):
        assert has == []
    else:
        assert has == list(kronecker_only)


def test_block_helper_instance_has_no_rows_and_kind_is_read_only():
    helper = BatchNormHelper(nn.BatchNorm2d(3), "bn")
    assert not hasattr(helper, "a_rows") and not hasattr(helper, "g_rows")
    assert helper.kind == "blocks" and LinearHelper(nn.Linear(2, 2), "fc").kind == "kronecker"
    with pytest.raises(AttributeError):
        helper.kind = "kronecker"


def test_registry_wants_one_family():
    class Bare(LayerHelper):
        kind = "kronecker"

    with pytest.raises(TypeError, match="KroneckerHelper or BlockHelper"):
        register_layer_helper(nn.PReLU, Bare)


def _kronecker_cases():
    torch.manual_seed(0)
    linear = nn.Linear(5, 3).double()
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    embedding = nn.Embedding(7, 3, padding_idx=0).double()
    return [
        (LinearHelper(linear, "fc"), torch.randn(2, 4, 5, dtype=torch.float64)),
        (Conv2dHelper(conv, "conv"), torch.randn(2, 4, 5, 5, dtype=torch.float64)),
        (EmbeddingHelper(embedding, "emb"), torch.tensor([[0, 1, 1], [3, 6, 1]])),
    ]


@pytest.mark.parametrize("case", range(3), ids=["linear", "conv2d", "embedding"])
def test_a_factor_update_and_a_square_sum_agree_with_the_rows(case):
    """The capability methods every Kronecker helper has (defaults from ``a_rows``, the
    convolution's lean path, the Embedding's counts) give ``Σ ã ãᵀ`` and ``Σ ã²``."""
    helper, x = _kronecker_cases()[case]
    if helper.a_diagonal:
        ids = x.reshape(-1)
        one_hot = nn.functional.one_hot(ids, helper.a_dim).double()
        one_hot[ids == helper.module.padding_idx] = 0
        rows = one_hot.unsqueeze(0)
    else:
        rows = helper.a_rows(x)
    full = rows.transpose(1, 2) @ rows
    want = torch.diagonal(full, dim1=-2, dim2=-1) if helper.a_diagonal else full
    a = torch.full_like(want, float("nan"))
    helper.a_factor_update(x, a, beta=0.0)  # ignores the NaNs
    assert_close(a, want, n=rows.shape[1])
    helper.a_factor_update(x, a, beta=0.5)
    assert_close(a, 1.5 * want, n=rows.shape[1])
    square, count = helper.a_square_sum(x, torch.float64)
    assert count == rows.shape[1] == helper.rows_count(x)
    assert_close(square, rows.square().sum(1), n=rows.shape[1])


def _sources(*folders: str) -> dict[str, str]:
    return {
        path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def test_no_module_branches_on_helper_strings_or_attributes():
    found = {}
    for path, text in _sources("secondorder").items():
        for pattern in _FORBIDDEN:
            count = text.count(pattern)
            if count != _PENDING.get((path, pattern), 0):
                found[(path, pattern)] = count
    assert found == {}, "branch on isinstance(layer, KroneckerHelper / BlockHelper) instead"


def test_every_declared_dependency_is_imported():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    code = "\n".join(_sources("secondorder", "kernels").values())
    unused = []
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()
        module = _IMPORT_NAMES.get(name, name.replace("-", "_"))
        if not re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", code, re.MULTILINE):
            unused.append(name)
    assert unused == []
