"""Stanchion: reliability middleware for event-driven LLM services on FastStream and NATS.

The repository keeps ``contracts/``, ``middleware/`` and ``handlers/`` at its root; installed, they are
``stanchion.contracts``, ``stanchion.middleware`` and ``stanchion.handlers`` (this directory links them in).
"""
