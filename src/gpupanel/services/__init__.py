"""Members of the runtime loop: sampler, prober, supervisor, runtime."""
