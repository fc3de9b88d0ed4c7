"""The combine's slot sums (moekit.kernels.slot_sums) against float64 torch sums: weighted or not, with an
indirection to the rows or without, with an added tensor or without, empty slots and no entries at all.
Run under TRITON_INTERPRET=1 on the CPU, natively on GPU."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def sum_into_slots(skip_unless_triton_runs, dtype):
    skip_unless_triton_runs(dtype)
    from moekit.kernels.slot_sums import sum_into_slots

    return sum_into_slots


def expected_sums(rows, slot, num_slots, row, weight, add) -> torch.Tensor:
    """The definition, in float64: out[s] = sum over entries i of slot s of weight[i] * rows[row[i]] (+ add[s])."""
    out = torch.zeros(num_slots, rows.shape[1], dtype=torch.float64)
    picked = rows.double()[row] * (1.0 if weight is None else weight.double()[:, None])
    out.index_add_(0, slot, picked)
    return out if add is None else out + add.double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_rows=st.integers(0, 30),
    num_entries=st.one_of(st.just(0), st.integers(0, 40)),
    num_slots=st.integers(0, 12),
    hidden=st.one_of(st.integers(1, 70), st.just(1100)),
    options=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**31 - 1),
)
def test_sum_into_slots_matches_the_float64_sum(
    sum_into_slots, dtype, device, num_rows, num_entries, num_slots, hidden, options, seed
):
    indirect, weighted, added = options
    if not num_slots or (not num_rows and (indirect or not num_entries)):
        num_entries = 0  # entries need a slot and a row
    elif not indirect:
        num_entries = num_rows  # entry i is row i
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_rows, hidden, generator=g)
    slot = torch.randint(0, max(num_slots, 1), (num_entries,), generator=g)
    row = torch.randint(0, max(num_rows, 1), (num_entries,), generator=g) if indirect else torch.arange(num_entries)
    weight = torch.rand(num_entries, generator=g) + 0.1 if weighted else None
    add = torch.randn(num_slots, hidden, generator=g) if added else None
    out = sum_into_slots(
        rows.to(device, dtype), slot.to(device), num_slots, dtype,
        row_of_entry=row.to(device) if indirect else None,
        weight_of_entry=None if weight is None else weight.to(device),
        add=None if add is None else add.to(device, dtype),
    )  # fmt: skip
    assert out.shape == (num_slots, hidden) and out.dtype == dtype and out.device.type == device.type
    add_as_stored = None if add is None else add.to(dtype)
    expected = expected_sums(rows.to(dtype), slot, num_slots, row, weight, add_as_stored)
    assert_close_to_reference(out, expected, dtype, "slot sums")
    empty = torch.bincount(slot, minlength=num_slots) == 0  # written too: zero, or add
    assert torch.equal(out.cpu()[empty].double(), expected[empty].to(dtype).double())
