"""afm-jax: orthopaedic radiograph foundation models in JAX."""
