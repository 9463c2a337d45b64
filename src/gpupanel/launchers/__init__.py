"""Process launchers: `gpupanel demo` (a simulated workstation with traffic) and the Voila
server of the dashboard. They sit above the client (`gpupanel.client`) in the layers."""
