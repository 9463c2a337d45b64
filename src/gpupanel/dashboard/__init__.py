"""The Voila dashboard: `dashboard.ipynb` (package data, served by
`gpupanel.launchers.voila`) and the app its kernel runs (`gpupanel.dashboard.app`).

Kept free of imports so that locating the notebook does not import the widgets.
"""
