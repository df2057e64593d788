"""Moved to `lomix.methods.glider.library` (a method is one package); this name stays an alias of it."""

import sys

from lomix.methods.glider import library

sys.modules[__name__] = library
