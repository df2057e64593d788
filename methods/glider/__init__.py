"""GLIDER and PHATGOOSE (METHODS.md section 4): their routers, the expert library, its config
section, recipe and verbs."""
