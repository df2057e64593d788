"""The errors `lomix.hub` raises. Each names the repository (or folder) and file, and the fix.

They derive from `lomix.LomixError` (so one ``except LomixError`` covers the library and the hub) and
from the built-in exception a caller would naturally catch.
"""

from __future__ import annotations

from lomix.errors import ArchitectureMismatchError, CheckpointError, LomixError


class HubError(LomixError):
    """Base class of the errors raised by `lomix.hub`."""


class SpecError(HubError, ValueError):
    """A source spec, repo id, revision or subfolder is malformed."""


class UnsafePathError(HubError, ValueError):
    """A file name (from a repository listing, a subfolder or a revision) points outside its folder."""


class UnsafeWeightsError(HubError, CheckpointError):
    """Weights are only available as pickle files (``.bin``, ``.pt``...), which lomix never loads."""


class NotFoundError(HubError, FileNotFoundError):
    """The repository, revision or file does not exist (or is private and no valid token was sent)."""


class OfflineError(HubError, ConnectionError):
    """The hub could not be reached and the file is not in the local cache."""


class DownloadError(HubError, OSError):
    """A download started but did not complete; nothing was put in place of an existing copy."""


class AccessError(HubError, PermissionError):
    """The hub refused the request (missing or insufficient token)."""


class AdapterError(HubError, CheckpointError):
    """A PEFT adapter folder is malformed (config, tensor names or shapes)."""


class UnsupportedAdapterError(AdapterError):
    """A PEFT adapter uses a feature that a frozen LoRA expert cannot reproduce (DoRA, trained biases...)."""


class BaseModelMismatchError(HubError, ArchitectureMismatchError):
    """An adapter was trained on a different base model than the one given; the message names both."""
