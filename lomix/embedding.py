"""Moved to `lomix.methods.glider.embedding` (a method is one package); this name stays an alias of it."""

import sys

from lomix.methods.glider import embedding

sys.modules[__name__] = embedding
