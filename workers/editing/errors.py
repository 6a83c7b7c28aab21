"""The one error an edit step turns into a skipped edit."""


class EditFailure(RuntimeError):
    """An edit that cannot be made (bad input or a numerical fault); the model is left untouched."""
