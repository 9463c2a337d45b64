"""The panel in a JupyterLab side area: `panel.show(area="right")` (docs/api.md, "Jupyter").

JupyterLab shows an output in a side area through the `sidecar` package (the
jupyterlab-sidecar widget: `sidecar.Sidecar`, an output area that JupyterLab docks beside the
notebook). It is optional: without it, `show(area=...)` raises one clear line saying how to
install it, and `show()` still shows the panel in the cell. The side area exists only in
JupyterLab (not in Voila or the classic Notebook, where nothing appears).
"""

from __future__ import annotations

import importlib
from typing import Any

from gpupanel.errors import GpuPanelError

AREAS = (
    "right",
    "split-right",
    "split-left",
    "split-top",
    "split-bottom",
    "tab-before",
    "tab-after",
)
"""Where JupyterLab can dock it (the sidecar's anchors): `right` is the right sidebar, the
`split-*` ones split the main area beside the notebook, `tab-*` open a tab next to it."""
MISSING = (
    "showing the panel in a JupyterLab side area needs the sidecar package in this kernel's "
    "environment (pip install sidecar, then reload the JupyterLab page); panel.show() without "
    "area= shows it in the cell"
)


def sidecar_class() -> Any:
    """`sidecar.Sidecar`, or GpuPanelError(MISSING) when the package is not installed."""
    try:
        return importlib.import_module("sidecar").Sidecar
    except ImportError:
        raise GpuPanelError(MISSING) from None


def check_area(area: str) -> str:
    """`area` if JupyterLab can dock there, else GpuPanelError naming the choices."""
    if area not in AREAS:
        raise GpuPanelError(f"area must be one of {', '.join(AREAS)}; got {area!r}")
    return area


class SideView:
    """A widget shown in a JupyterLab side area. Its repr is one line (so a cell ending with
    `panel.show(area="right")` shows no second copy); `close()` closes the area and the
    widget."""

    def __init__(self, widget: Any, area: str, title: str = "gpupanel") -> None:
        from IPython.display import display

        self.widget = widget
        self.area = area
        self.sidecar = sidecar_class()(title=title, anchor=area)
        with self.sidecar:  # the output goes to the side area, not the cell
            display(widget)

    def close(self) -> None:
        """Close the side area and the widget in it."""
        self.sidecar.close()
        self.widget.close()

    def __repr__(self) -> str:
        return f"<gpupanel panel in the JupyterLab side area {self.area!r}; .close() closes it>"
