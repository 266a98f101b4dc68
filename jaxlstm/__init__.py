"""jaxlstm: the seed's LSTM cell, and the classic one, as pure JAX functions.

Shape letters used in every docstring: ``B`` batch, ``T`` time, ``I`` input
features, ``H`` hidden features.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from ._cell import forget_gate as forget_gate
from ._cell import input_gate as input_gate
from ._cell import lstm_step as lstm_step
from ._cell import output_gate as output_gate
from ._layer import lstm as lstm
from ._params import GATE_ORDER as GATE_ORDER
from ._params import LSTMParams as LSTMParams
from ._params import LSTMState as LSTMState
from ._params import init_params as init_params
from ._params import params_from_gates as params_from_gates
from ._params import zero_state as zero_state
from ._stack import BidirectionalParams as BidirectionalParams
from ._stack import BidirectionalState as BidirectionalState
from ._stack import bidirectional as bidirectional
from ._stack import init_stack as init_stack
from ._stack import lstm_stack as lstm_stack

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
    "zero_state",
]
