"""Jupyter widgets, magics and the PanelSource binder."""
