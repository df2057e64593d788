"""Moved to `lomix.methods.poly.hooks` (a method is one package); this name stays an alias of it."""

import sys

from lomix.methods.poly import hooks

sys.modules[__name__] = hooks
