"""Flax adapters: ``qjax.flax.linen`` (layers and an interceptor) and ``qjax.flax.nnx``."""
