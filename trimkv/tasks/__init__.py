"""Benchmarks. Importing this package registers every built-in task."""

from trimkv.tasks.base import GradeResult, Sample, Task, build_task, register_task

__all__ = ["GradeResult", "Sample", "Task", "build_task", "register_task"]
