"""Simulators: the caller that dials as a provider does, the reference engine that speaks the PersonaPlex
protocol without a GPU, the scenario suite, and the speech recordings they play."""
