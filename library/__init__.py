"""sdtk's shared machinery (see README.md for the layout)."""

import logging as _logging

# bitsandbytes (an optional extra that diffusers imports when present) warns on import on CPU-only
# machines about an optional "kernels" package; the message is noise for sdtk users.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
