"""The combine's slot sums (moekit.kernels.slot_sums) against float64 torch sums: weighted or not, with an
indirection to the rows or without, with an added tensor or without, empty slots and no entries at all.
Run under TRITON_INTERPRET=1 on the CPU, natively on GPU."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moekit.testing import ROUNDED_ONCE_TOLERANCE, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Slot sums round once to their storage dtype: ROUNDED_ONCE_TOLERANCE. Measured with 64 (8) entries a slot,
# weighted, H = 256: float16 kernel 2.1e-4, twin adding in float16 1.2e-3 (5.1e-4); bfloat16 (the float32 sum
# rounded: the interpreter computes bf16 wrongly) 1.6e-3, twin 9.7e-3 (4.1e-3). float32 adds in its own dtype,
# so its twin rounds the entry weights to bfloat16: kernel 1.5e-7 (6.3e-8), twin 1.7e-3.
# test_bound_sits_between_the_kernel_and_its_weaker_twin measures both on every run.


@pytest.fixture
def sum_into_slots(triton_device):
    """The kernel, or triton_device's skip (at setup, before Hypothesis runs an example)."""
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
@example(num_rows=12, num_entries=35, num_slots=1, hidden=1, options=(True, True, True), seed=12)  # cancels
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
    # rounded once to dtype, relative to the sums; plus float32's rounding of each addition, relative to the sums
    # of magnitudes (a slot whose entries cancel has a small sum: one slot of 35 entries, H = 1 missed 2e-5 by 2x)
    add_magnitudes = None if add is None else add_as_stored.abs()
    magnitudes = expected_sums(rows.to(dtype).abs(), slot, num_slots, row, weight, add_magnitudes)
    most_entries = int(torch.bincount(slot, minlength=1).max())
    accumulation = most_entries * 2.0**-24 * float(torch.linalg.vector_norm(magnitudes))
    error = float(torch.linalg.vector_norm(out.cpu().double() - expected))
    bound = ROUNDED_ONCE_TOLERANCE[dtype] * float(torch.linalg.vector_norm(expected)) + accumulation
    assert error <= bound, f"slot sums: error {error:.3e} over {bound:.1e} (norm of the sums {expected.norm():.1e})"
    empty = torch.bincount(slot, minlength=num_slots) == 0  # written too: zero, or add
    assert torch.equal(out.cpu()[empty].double(), expected[empty].to(dtype).double())


def _weaker_twin(rows, slot, num_slots, weight, dtype) -> torch.Tensor:
    """The slot sums one step weaker: added in the storage dtype, one rounding per entry (float16, bfloat16),
    or in float32 with each entry's weight rounded to bfloat16 (float32)."""
    if dtype == torch.float32:
        return expected_sums(rows, slot, num_slots, torch.arange(len(slot)), weight.bfloat16(), None).float()
    out = torch.zeros(num_slots, rows.shape[1], dtype=dtype)
    for i in range(len(slot)):  # entries in order, as the kernel's loop takes them
        out[slot[i]] = out[slot[i]] + (rows[i].float() * weight[i]).to(dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bound_sits_between_the_kernel_and_its_weaker_twin(sum_into_slots, dtype, device):
    """8 slots of 64 weighted entries, H = 256: the kernel's error is under ROUNDED_ONCE_TOLERANCE[dtype] and its
    weaker twin's (_weaker_twin) over it, so a kernel that adds in the storage dtype fails the Hypothesis test
    wherever a slot gathers a few entries."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(512, 256, generator=g).to(dtype)
    slot, weight = torch.arange(512) % 8, torch.rand(512, generator=g) + 0.1
    expected = expected_sums(rows, slot, 8, torch.arange(512), weight, None)
    out = sum_into_slots(rows.to(device), slot.to(device), 8, dtype, weight_of_entry=weight.to(device))
    kernel_error = relative_error(out, expected)
    twin_error = relative_error(_weaker_twin(rows, slot, 8, weight, dtype), expected)
    bound = ROUNDED_ONCE_TOLERANCE[dtype]
    assert kernel_error < bound < twin_error, f"kernel {kernel_error:.2e}, twin {twin_error:.2e}: {bound:.0e} between"
