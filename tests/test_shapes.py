"""attnkern.shapes.broadcast_shapes agrees with torch.broadcast_shapes, refusals included."""
import itertools

import pytest
import torch

from attnkern.shapes import broadcast_shapes

DIMS = [(), (1,), (0,), (3,), (1, 1), (2, 1), (1, 3), (2, 3), (0, 3), (4, 1, 3), (4, 2, 1)]


@pytest.mark.parametrize("a,b", list(itertools.product(DIMS, repeat=2)))
def test_matches_torch(a, b):
    try:
        expected = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        with pytest.raises(RuntimeError, match="do not broadcast"):
            broadcast_shapes(a, b)
        return
    assert broadcast_shapes(a, b) == expected


def test_three_shapes():
    assert broadcast_shapes((2, 1, 5), (1, 3, 1), (5,)) == (2, 3, 5)
    with pytest.raises(RuntimeError):
        broadcast_shapes((2,), (2,), (3,))
