"""The launch stack: the supervisor and its pre-flight checks, the warm start (client, server, wire), the
torchrun wrapper and the per-attempt exit-status channel. Nothing in the engine imports it."""
