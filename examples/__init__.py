"""Device models built on the public API of intercept-dispatch."""
