"""The API prices jobs from `service.api.cost.BUILTIN_SHAPES` because it may not load models (no torch in the
API process). Those shapes mirror the builtin models of `workers/models.py`; this test loads each builtin and
checks that every adaptable module and its input and output widths are exactly what the mirror says, so an edit
to one side alone fails here instead of silently mispricing estimates."""

from __future__ import annotations

import pytest

from circuits.layer import linear_features
from service.api.cost import BUILTIN_SHAPES
from workers.models import load_model


@pytest.mark.parametrize("name", sorted(BUILTIN_SHAPES))
def test_builtin_shapes_match_the_models(name, request):
    models_dir = request.getfixturevalue("smollm2_models_dir") if "smollm2" in name else None
    model = load_model(name, models_dir=models_dir).model
    shape = BUILTIN_SHAPES[name]
    actual = {}
    for module_name, module in model.named_modules():
        if module_name.startswith(shape.prefix + "."):
            try:
                actual[module_name] = linear_features(module)
            except TypeError:  # not an adaptable module
                continue
    expected = {
        f"{shape.prefix}.{block}.{module}": (d_in, d_out)
        for block in range(shape.blocks)
        for module, d_in, d_out in shape.modules
    }
    assert actual == expected
