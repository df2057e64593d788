"""Moved to `lomix.methods.glider.recipe` (a method is one package); this name stays an alias of it,
and ``python -m lomix.recipes.glider`` still runs it."""

import sys

from lomix.methods.glider import recipe

if __name__ == "__main__":
    recipe.main()
else:
    sys.modules[__name__] = recipe
