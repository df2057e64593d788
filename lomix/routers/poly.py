"""Moved to `lomix.methods.poly.router` (a method is one package); this name stays an alias of it."""

import sys

from lomix.methods.poly import router

sys.modules[__name__] = router
