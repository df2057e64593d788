"""Poly and MHR (METHODS.md section 1): their routers (one routing row per task), the task-row helpers,
the few-shot config section and the training hooks that name task rows and build a few-shot start."""
