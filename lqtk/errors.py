class LqtkError(ValueError):
    """A problem with the user's input (model, corpus, recipe, output folder). The CLI prints its message, which
    names the problem and the fix, and exits non-zero without a traceback."""
