"""Moved to `lomix.methods.loramixer.recipe` (a method is one package); this name stays an alias of it,
and ``python -m lomix.recipes.loramixer`` still runs it."""

import sys

from lomix.methods.loramixer import recipe

if __name__ == "__main__":
    recipe.main()
else:
    sys.modules[__name__] = recipe
