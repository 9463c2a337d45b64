"""The ring buffer behind the live charts (`gpupanel.core.history`)."""

from __future__ import annotations

import pytest

from gpupanel.core.history import History


def test_keeps_samples_in_order_and_aligns_series() -> None:
    h = History(("used", "total"))
    assert len(h) == 0 and h.last_time is None and h.latest("used") is None
    assert h.append(1.0, {"used": 10, "total": 100})
    assert h.append(2.0, {"used": 20})  # a missing field is None
    assert h.times() == [1.0, 2.0]
    assert h.series("used") == [10, 20]
    assert h.series("total") == [100, None]
    assert h.latest("used") == 20 and h.last_time == 2.0


def test_ignores_samples_that_are_not_newer() -> None:
    h = History(("v",))
    assert h.append(5.0, {"v": 1})
    version = h.version
    assert not h.append(5.0, {"v": 2})  # the same snapshot again
    assert not h.append(4.0, {"v": 3})  # out of order
    assert h.series("v") == [1] and h.version == version


def test_drops_samples_older_than_the_window() -> None:
    h = History(("v",), window_s=10)
    for t in range(0, 30):
        h.append(float(t), {"v": t})
    assert h.times() == [float(t) for t in range(19, 30)]  # 29 - 10 = 19 is still inside
    assert h.series("v")[0] == 19


def test_caps_the_number_of_points() -> None:
    h = History(("v",), window_s=1e9, max_points=5)
    for t in range(12):
        h.append(float(t), {"v": t})
    assert len(h) == 5 == h.max_points
    assert h.series("v") == [7, 8, 9, 10, 11]


def test_version_counts_changes_and_clear() -> None:
    h = History(("v",))
    assert h.version == 0
    h.append(1.0, {"v": 1})
    h.append(2.0, {"v": 2})
    assert h.version == 2
    h.clear()
    assert len(h) == 0 and h.version == 3
    h.clear()  # nothing to clear: no change
    assert h.version == 3


def test_rejects_bad_arguments_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="at least one field"):
        History(())
    with pytest.raises(ValueError, match="unique"):
        History(("a", "a"))
    with pytest.raises(ValueError, match="window_s"):
        History(("a",), window_s=0)
    with pytest.raises(ValueError, match="max_points"):
        History(("a",), max_points=0)
    h = History(("a",))
    with pytest.raises(KeyError, match="'b'"):
        h.series("b")
    with pytest.raises(KeyError, match="b"):
        h.append(1.0, {"b": 1})
    with pytest.raises(KeyError, match="'b'"):
        h.latest("b")
