"""The errors lomix raises on bad input.

Every error names the culprit (a config field, a module, a file) and what was expected, so that a
user can fix the input without reading lomix's source. All of them derive from `LomixError`; each
also derives from the built-in exception a caller would naturally catch (ValueError, TypeError,
FileNotFoundError) so generic handlers keep working.
"""

from __future__ import annotations


class LomixError(Exception):
    """Base class of every error lomix raises on purpose."""


class ConfigError(LomixError, ValueError):
    """A configuration field has an impossible value.

    Args:
        field: dotted name of the field (``router.k``).
        message: what is wrong and what was expected.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class TargetModulesNotFoundError(ConfigError):
    """No module (or not every named module) of the model matches ``target_modules``."""


class UnsupportedModuleError(LomixError, TypeError):
    """A targeted module is of a type lomix cannot wrap."""


class RepackedWeightError(UnsupportedModuleError):
    """bitsandbytes repacked a 4-bit weight into its AVX512-BF16 CPU layout before lomix saw the model.

    Args:
        module: the layer's name in its model (or its type when the name is unknown).
        shape: ``"in_features -> out_features"``.
    """

    def __init__(self, module: str, shape: str):
        self.module = module
        super().__init__(
            f"{module} (4-bit, {shape}): bitsandbytes already repacked this weight for AVX512-BF16 CPU inference "
            "(a no-grad eval forward ran before lomix saw the model), which rounded its block scales to bf16 and "
            "cannot be undone exactly; load the base again and call lomix.quant.disable_cpu_repacking(model) "
            "(lomix.inject, lomix.load and prepare_kbit_training do it) before running it"
        )


class CheckpointError(LomixError):
    """A saved mixture cannot be loaded (or written)."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A file a mixture needs is not there."""


class CorruptFileError(CheckpointError):
    """A file exists but cannot be parsed."""


class ShapeMismatchError(CheckpointError):
    """A saved tensor's shape does not match the module it belongs to."""


class ArchitectureMismatchError(CheckpointError):
    """A mixture was saved for a different base architecture or a different set of modules."""


class RoutingError(LomixError, ValueError):
    """A router was given inputs it cannot route (for example an unknown task id)."""


class TargetNotCalledError(ConfigError):
    """A wrapped module's forward never runs (its parent reads its weight directly): its experts
    would have no effect and learn nothing."""
