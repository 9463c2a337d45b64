"""Model-server runtimes: Ollama, llama.cpp server, vLLM."""
