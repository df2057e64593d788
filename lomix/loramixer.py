"""Moved to `lomix.methods.loramixer.library` (a method is one package); this name stays an alias of it."""

import sys

from lomix.methods.loramixer import library

sys.modules[__name__] = library
