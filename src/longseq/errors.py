class LongseqError(Exception):
    """A problem with the user's input (path, file, flag). The CLI prints it as one line and exits 2."""
