"""Moved to `lomix.methods.remix.rloo` (a method is one package); this name stays an alias of it."""

import sys

from lomix.methods.remix import rloo

sys.modules[__name__] = rloo
