"""Moved to `lomix.methods.poly.mhr` (a method is one package); this name stays an alias of it."""

import sys

from lomix.methods.poly import mhr

sys.modules[__name__] = mhr
