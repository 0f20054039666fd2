"""The one exception type for bad user input: the CLI prints it as one line and exits with code 2."""


class UserError(ValueError):
    """Bad input from the user (a flag, a config file, a plug-in). Its message is one line."""
