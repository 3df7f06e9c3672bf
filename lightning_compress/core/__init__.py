"""Mechanisms every compression technique shares: when (progress), which (layers), how much (accounting)."""
