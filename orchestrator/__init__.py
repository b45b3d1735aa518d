"""gridckpt orchestrator: job model, wire protocol, bus, store, recovery line, CLI."""
