"""LoRA-Mixer (METHODS.md section 2): its router, library helpers, config section, stages recipe and verb."""
