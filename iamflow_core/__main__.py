import logging
import os
import sys

from .cli import main

code = main()
# Every output (videos, story maps, the kernel cache) is written and closed before main returns. Python's own
# teardown would then free the models' GPU memory, the CUDA graphs and the compiled kernels piece by piece, which
# the operating system does at once when the process ends: end it here.
sys.stdout.flush()
sys.stderr.flush()
logging.shutdown()
os._exit(code)
