"""Dissolved: the stages live in their own modules (see ``ddjax.cli.STAGES``).

Only this re-export remains, for ``ddjax.distill.run``'s final evaluation until it imports
:func:`ddjax.evaluate_stage.evaluate_into` itself; then delete this file.
"""

from ddjax.evaluate_stage import evaluate_into

__all__ = ["evaluate_into"]
