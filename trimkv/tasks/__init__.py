"""Benchmarks. Importing this package registers every built-in task."""

from trimkv.tasks.base import GradeResult, Sample, Task, build_task, register_task

# Importing the task modules registers them.
import trimkv.tasks.math  # noqa: E402,F401  (gsm8k, math500, aime24)
import trimkv.tasks.longmemeval  # noqa: E402,F401
import trimkv.tasks.longproc  # noqa: E402,F401
import trimkv.tasks.synthetic  # noqa: E402,F401

__all__ = ["GradeResult", "Sample", "Task", "build_task", "register_task"]
