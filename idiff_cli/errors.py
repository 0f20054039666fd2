"""The one exception type for bad user input: the CLI prints it as one line and exits with code 2."""


class UserError(ValueError):
    """Bad input from the user (a flag, a config file, a plug-in). Its message is one line."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): what a one-line error quotes of
    a library's or a plug-in's failure, whose messages may span many lines."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
