"""qdelta.stacks against a plain list of rows restacked by torch.stack."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdelta import stacks

_OPS = st.lists(st.tuples(st.booleans(), st.integers(0, 1000)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    ops=_OPS,
    shape=st.sampled_from([(3,), (2, 5), (4, 1, 3)]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int32]),
)
def test_appends_and_removals_match_a_restacked_list(ops, shape, dtype):
    rows: list[torch.Tensor] = []
    stack: torch.Tensor | None = None
    held: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a view taken then, its values)
    for add, seed in ops:
        if add or not rows:
            row = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 9).to(dtype)
            stack = stacks.started(row) if stack is None else stacks.appended(stack, row)
            rows.append(row)
        else:  # the last row moves into the freed one
            i = seed % len(rows)
            stack = stacks.without(stack, i)
            rows[i] = rows[-1]
            rows.pop()
            held = []  # a removal may move a row under older views
        want = torch.stack(rows) if rows else torch.empty((0, *shape), dtype=dtype)
        assert stack.dtype == dtype and stack.is_contiguous()
        assert torch.equal(stack, want)
        held_rows = stack.untyped_storage().nbytes() // (math.prod(shape) * stack.element_size())
        room = len(rows) + max(1, math.ceil(len(rows) * stacks.HEADROOM))
        # Growth reserves the headroom; removals keep the buffer until half is idle.
        assert len(rows) <= held_rows <= 2 * room
        held.append((stack, stack.clone()))
    for view, values in held:  # no later growth wrote into rows a view already had
        assert torch.equal(view, values)


def test_a_row_of_another_shape_is_refused():
    stack = stacks.started(torch.zeros(4))
    with pytest.raises(ValueError, match=r"expected shape \[4\], found \[5\]"):
        stacks.appended(stack, torch.zeros(5))


def test_the_last_row_removed_holds_nothing():
    stack = stacks.appended(stacks.started(torch.ones(8)), torch.ones(8))
    empty = stacks.without(stacks.without(stack, 0), 0)
    assert empty.shape == (0, 8) and empty.untyped_storage().nbytes() == 0


def test_an_inference_tensor_stack_grows_outside_inference_mode():
    with torch.inference_mode():
        stack = stacks.started(torch.ones(3))
    grown = stacks.appended(stack, torch.full((3,), 2.0))
    assert torch.equal(grown, torch.tensor([[1.0] * 3, [2.0] * 3]))


def test_removals_move_the_last_row_in_and_give_memory_back():
    rows = [torch.full((2,), float(i)) for i in range(64)]
    stack = stacks.started(rows[0])
    for row in rows[1:]:
        stack = stacks.appended(stack, row)
    buffer = stack.untyped_storage().data_ptr()
    stack = stacks.without(stack, 5)  # in place: row 63 now sits at 5
    assert stack.untyped_storage().data_ptr() == buffer
    assert stack.shape == (63, 2) and stack[5].tolist() == [63.0, 63.0]
    while stack.shape[0] > 8:
        stack = stacks.without(stack, 0)
    held = stack.untyped_storage().nbytes() // (2 * 4)
    assert held <= 2 * (8 + 2), held  # reallocated smaller on the way down
