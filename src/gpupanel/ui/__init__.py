"""The Jupyter widget panel (ipywidgets + bqplot) and its binder.

The widgets read a control plane through `gpupanel.ui.source.PanelSource`, never through
`gpupanel.client`: the client sits above the widgets (`Panel.show()` builds them)."""
