"""``python -m nad_ext``: the ``nad`` command (also what torchrun runs: ``torchrun ... -m nad_ext``)."""
import os
import sys

from nad_ext.cli import main

if __name__ == "__main__":
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: its report shows a rank's traceback
        from torch.distributed.elastic.multiprocessing.errors import record

        main = record(main)
    sys.exit(main())
