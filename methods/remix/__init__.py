"""ReMix (METHODS.md section 3): its router, the RLOO estimator (library helpers, config section and
the training hook that gives the finetune recipe its batch loss)."""
