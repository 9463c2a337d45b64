"""The simulated workstation: simulated GPUs, their memory ledger, and a fake Ollama server.

Everything here is labelled simulated in what it reports. It is a real program (real
processes, real files, real HTTP), so the rest of gpupanel is tested against it as it
would run against a real workstation.
"""
