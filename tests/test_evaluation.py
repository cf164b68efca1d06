"""Library pieces of an evaluation: the plain model every speed-up is measured against, and the timing's
spread and plausibility checks."""

from __future__ import annotations

import pytest
import torch

from layerexit.evaluation.benchmark import plain_forward
from tiny import CASE_IDS, CASES, make_batch
from tiny_vision import make_images, make_vit


@pytest.mark.parametrize("arch,feature", CASES, ids=CASE_IDS)
def test_plain_forward_equals_the_models_last_exit(models, arch, feature):
    """The denominator of every measured speed-up computes exactly the multi-exit model's last exit."""
    model = models(arch, feature)
    batch = make_batch(arch)
    inputs = {k: v for k, v in batch.items() if v is not None}
    with torch.no_grad():
        reference = model(**inputs)[-1]  # (B, C)
    plain = plain_forward(model, inputs)
    assert plain.shape == reference.shape
    torch.testing.assert_close(plain, reference, rtol=0, atol=1e-10)


def test_plain_forward_equals_the_last_exit_on_a_vit():
    model = make_vit("cls")
    images = make_images(3)
    with torch.no_grad():
        reference = model(pixel_values=images)[-1]
    torch.testing.assert_close(plain_forward(model, {"pixel_values": images}), reference, rtol=0, atol=1e-10)
