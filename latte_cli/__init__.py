"""latte: the command line and the parts the stages share (diffusion maths, the VAE, video I/O)."""


class LatteError(Exception):
    """A problem with the user's input (file, checkpoint, data, option). The CLI prints the message on one
    line and exits with code 1, without a traceback."""
