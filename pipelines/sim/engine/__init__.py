"""GPU-free reference engine speaking the PersonaPlex server protocol (for tests and local runs)."""

from pipelines.sim.engine.reference import EngineOptions, EngineStats, ReferenceEngine, main

__all__ = ["EngineOptions", "EngineStats", "ReferenceEngine", "main"]
