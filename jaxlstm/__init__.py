"""jaxlstm: LSTMs as pure JAX functions: the classic cell, and a cell whose
output gate applies a learned map ``W_o c + b_o`` to the cell state.

Shape letters used in every docstring: ``B`` batch, ``T`` time, ``I`` input
features, ``H`` hidden features.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from ._cell import lstm_step as lstm_step
from ._gates import forget_gate as forget_gate
from ._gates import input_gate as input_gate
from ._gates import output_gate as output_gate
from ._init import init_params as init_params
from ._init import params_from_gates as params_from_gates
from ._init import zero_state as zero_state
from ._layer import lstm as lstm
from ._layer import portable as portable
from ._stack import bidirectional as bidirectional
from ._stack import init_stack as init_stack
from ._stack import lstm_stack as lstm_stack
from ._streaming import Stepper as Stepper
from ._types import GATE_ORDER as GATE_ORDER
from ._types import BidirectionalParams as BidirectionalParams
from ._types import BidirectionalState as BidirectionalState
from ._types import LSTMParams as LSTMParams
from ._types import LSTMState as LSTMState

try:
    __version__ = _version("jaxlstm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "GATE_ORDER",
    "BidirectionalParams",
    "BidirectionalState",
    "LSTMParams",
    "LSTMState",
    "Stepper",
    "__version__",
    "bidirectional",
    "forget_gate",
    "init_params",
    "init_stack",
    "input_gate",
    "lstm",
    "lstm_stack",
    "lstm_step",
    "output_gate",
    "params_from_gates",
    "portable",
    "zero_state",
]
