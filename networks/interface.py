"""Re-export of :mod:`library.network_contract` (the network-module contract lives in the library).

Kept so that third-party code importing ``networks.interface`` keeps working.
"""

from library.network_contract import *  # noqa: F401,F403
from library.network_contract import __all__  # noqa: F401
