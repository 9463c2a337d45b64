"""`panel.show(area=...)`: the panel in a JupyterLab side area through the `sidecar` package
(docs/api.md, "Python API"), offline: the area's name is checked, a missing package is one
clear line, and the widget goes into a `sidecar.Sidecar` docked where asked. The browser
side (the sidebar in a real JupyterLab) is in test_jupyterlab_browser.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from gpupanel.client import Panel
from gpupanel.errors import GpuPanelError
from gpupanel.ui.side import AREAS, MISSING, SideView
from gpupanel.ui.widgets import PanelWidget
from tests.conftest import free_port


@pytest.fixture
def panel() -> Iterator[Panel]:
    p = Panel(f"http://127.0.0.1:{free_port()}", timeout=5)  # nothing answers: no matter here
    yield p
    p.shutdown()


def test_show_in_the_right_sidebar(panel: Panel) -> None:
    pytest.importorskip("sidecar")
    side = panel.show(area="right")
    try:
        assert isinstance(side, SideView) and isinstance(side.widget, PanelWidget)
        assert type(side.sidecar).__name__ == "Sidecar"
        assert side.sidecar.anchor == "right" and side.sidecar.title == "gpupanel"
        assert repr(side) == (
            "<gpupanel panel in the JupyterLab side area 'right'; .close() closes it>"
        )
        assert side.widget.running
    finally:
        side.close()
    assert not side.widget.running and side.sidecar.comm is None


def test_an_unknown_area_is_refused_before_anything_starts(panel: Panel) -> None:
    with pytest.raises(GpuPanelError, match="area must be one of right, split-right"):
        panel.show(area="left-ish")
    assert "split-right" in AREAS and "tab-after" in AREAS


def test_without_the_sidecar_package_one_line_says_how_to_get_it(
    panel: Panel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sidecar", None)  # any import of it fails
    with pytest.raises(GpuPanelError) as raised:
        panel.show(area="right")
    assert str(raised.value) == MISSING and "pip install sidecar" in MISSING
    assert "\n" not in MISSING
