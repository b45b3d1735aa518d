"""Checkpointer backends behind the common checkpointer API."""
