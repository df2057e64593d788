"""Moved to `lomix.methods.loramixer.router` (a method is one package); this name stays an alias of it."""

import sys

from lomix.methods.loramixer import router

sys.modules[__name__] = router
