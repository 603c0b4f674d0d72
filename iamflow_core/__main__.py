import contextlib
import logging
import os
import sys

from .cli import main

try:
    code = main()
except BrokenPipeError:  # the reader of our output went away (`... | head`): stop quietly, as other tools do
    code = 1
# Every output (videos, story maps, the kernel cache) is written and closed before main returns. Python's own
# teardown would then free the models' GPU memory, the CUDA graphs and the compiled kernels piece by piece (1.2 s
# on an H200), which the operating system does at once when the process ends: end it here.
for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(OSError, ValueError):  # a reader that went away, a closed stream: nothing left to say
        stream.flush()
logging.shutdown()
os._exit(code)
