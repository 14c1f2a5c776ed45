"""Transports that carry intercept and completion frames to a Dispatcher."""
