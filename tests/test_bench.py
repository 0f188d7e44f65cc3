"""``memhead.bench``'s CPU peak-memory estimate: measured from the part's start, not the process's."""

import pytest
import torch

from memhead import bench


def test_peak_is_counted_from_the_reset_not_from_what_came_before():
    big = torch.ones(64 << 20, dtype=torch.uint8)  # a 64 MB high-water mark before the part
    del big
    resident = bench._reset_peak_resident()
    if resident is None:
        pytest.skip("no resettable resident high-water mark on this system")
    assert bench._status_bytes("VmHWM") - resident < 16 << 20
    part = torch.ones(32 << 20, dtype=torch.uint8)  # the part: 32 MB touched
    assert bench._status_bytes("VmHWM") - resident >= 30 << 20
    del part
