"""``shoal bench serial --driver``: every driver runs through the paced line and is measured.

Small image, so the test stays short; the figures themselves come from the
full-size benchmark, not from here.
"""

from __future__ import annotations

import pytest

from shoal import bench_drivers
from tests.conftest import skip_inside_readme_run

pytestmark = pytest.mark.slow


def test_every_driver_puts_the_image_through_the_relay_and_gets_a_figure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    skip_inside_readme_run()
    rows = bench_drivers.run(image_kib=16, drivers=bench_drivers.DRIVERS, as_json=False)
    assert [(r.driver, r.flash_timing) for r in rows] == [
        (driver, timing) for timing in (False, True) for driver in bench_drivers.DRIVERS
    ]
    for row in rows:
        assert row.ok, row.detail
        # Nothing beats the line; a figure far below it would mean a stall.
        assert 0.2 < row.ratio_to_line < 1.0, row
        if row.driver != "smpclient":
            assert row.ratio_to_smpclient is not None
    printed = capsys.readouterr().out
    assert printed.count("of the line") == len(rows)
