"""The runtime's running tally of resident bytes against a recount from scratch."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qdelta.runtime import _Footprint, _stacked_bytes, _StackTally

_PLANE = {"a": 64, "b": 24, "c": 1000}  # a layer's bytes per plane, fixed per layer
_FOOTPRINTS = st.builds(
    _Footprint,
    layers=st.dictionaries(st.sampled_from(sorted(_PLANE)), st.integers(1, 4), max_size=3).map(
        lambda d: {name: (bits, _PLANE[name]) for name, bits in d.items()}
    ),
    params=st.integers(0, 5000),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(_FOOTPRINTS, st.booleans(), st.integers(0, 99)), max_size=30))
def test_the_tally_equals_a_recount_through_loads_and_evictions(ops):
    tally, loaded = _StackTally(), []
    for fp, load, pick in ops:
        assert tally.with_one_more(fp) == _stacked_bytes([*loaded, fp])
        if load or not loaded:
            tally.add(fp)
            loaded.append(fp)
        else:
            tally.remove(loaded.pop(pick % len(loaded)))
        assert tally.bytes == _stacked_bytes(loaded)
