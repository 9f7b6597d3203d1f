"""Staged rollouts: the pure planner (waves, thresholds, phases) and the driver that applies it."""
