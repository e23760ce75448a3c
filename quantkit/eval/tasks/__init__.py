"""lm-evaluation-harness task configs (``local_*``, tag ``quantkit_local``) that read local benchmark files.

See :mod:`quantkit.eval.tasks.loaders` for the loaders, ``LOCAL_TASKS`` and ``TASKS_DIR``.
"""
