"""Typed errors. Every error says what was expected and where.

Two families, mapped to CLI exit codes:

* :class:`InputError` (exit 2): the user's model, pipeline, data or budget is
  unusable as given.  The message names the file / op / node / option.
* everything else deriving from :class:`QCompileError` (exit 1): qcompile itself
  failed (a pass broke an invariant, a verified artifact did not match).
"""

from __future__ import annotations


class QCompileError(Exception):
    """Base of all qcompile errors."""

    exit_code = 1


class InputError(QCompileError):
    """The input (model file, pipeline text, data, budget, target) is unusable."""

    exit_code = 2


class ModelLoadError(InputError):
    """A model file could not be read or parsed."""


class UnsupportedOpError(InputError):
    """A frontend met an operator it cannot represent faithfully.

    The message names the op type, the node and what the user can do instead.
    """

    def __init__(self, op_type: str, node_name: str, alternative: str = "", frontend: str = ""):
        self.op_type = op_type
        self.node_name = node_name
        self.alternative = alternative
        where = f" ({frontend} frontend)" if frontend else ""
        msg = f"unsupported op '{op_type}' at node '{node_name}'{where}"
        if alternative:
            msg += f"; {alternative}"
        super().__init__(msg)


class ShapeError(InputError):
    """Shapes are missing, dynamic where static ones are needed, or inconsistent."""


class PipelineError(InputError):
    """Pipeline text does not parse, names an unknown pass, or has a bad option."""


class SearchError(InputError):
    """A compression search cannot meet the user's budget (infeasible, or no finalist qualifies)."""


class TargetError(InputError):
    """Unknown target, or a target this machine cannot serve."""


class IRVerificationError(QCompileError):
    """The IR is structurally invalid (dangling value, cycle, bad shapes)."""


class PreconditionError(QCompileError):
    """A pass was run on IR that does not satisfy what the pass requires."""


class PostconditionError(QCompileError):
    """A pass produced IR that does not satisfy what it promised."""


class NumericsError(QCompileError):
    """A compiled model's outputs differ from the reference beyond the tolerance."""
