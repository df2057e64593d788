"""Moved to `lomix.methods.remix.router` (a method is one package); this name stays an alias of it."""

import sys

from lomix.methods.remix import router

sys.modules[__name__] = router
