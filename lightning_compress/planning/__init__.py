"""Compress to a target: per-layer latency measured on the deployment runtime, sensitivities, the planner.

:mod:`.latency` (the measured per-layer table), :mod:`.widths` (channel groups as planning variables and
their sensitivity), :mod:`.planner` (targets, the calibrated latency model, the greedy search),
:mod:`.target` (all of it for one network) · :mod:`.callback` (``CompressToTarget``).
"""

from lightning_compress.planning.callback import CompressToTarget
from lightning_compress.planning.planner import Plan, Target, UnreachableTargetError
from lightning_compress.planning.target import TargetPlanner

__all__ = ["CompressToTarget", "Plan", "Target", "TargetPlanner", "UnreachableTargetError"]
