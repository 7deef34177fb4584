class LongseqError(Exception):
    """A problem with the user's input (path, file, flag). The CLI prints it as one line and exits 2."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line, for messages that must fit on one line."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]
