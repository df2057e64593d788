"""Moved to `lomix.methods.glider.router` (a method is one package); this name stays an alias of it."""

import sys

from lomix.methods.glider import router

sys.modules[__name__] = router
