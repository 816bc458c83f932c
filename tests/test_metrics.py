"""shapefirst.metrics against closed forms."""
import math

import pytest

from shapefirst.metrics import wilson


def test_wilson_matches_its_closed_form_and_stays_in_the_unit_interval():
    # k=0: the closed form's lower bound is 0 exactly (c == h), but float rounding gave -0.0 or below
    lo, hi = wilson(0, 80)
    assert lo == 0.0 and math.copysign(1.0, lo) == 1.0
    assert hi == pytest.approx(1.96 ** 2 / (80 + 1.96 ** 2))  # Wilson upper bound at k=0: z^2 / (n + z^2)
    lo, hi = wilson(24, 24)
    assert hi == 1.0 and lo == pytest.approx(24 / (24 + 1.96 ** 2))
    assert f"{wilson(0, 80)[0]:.1%}" == "0.0%"
