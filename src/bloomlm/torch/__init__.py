"""bloomlm's PyTorch side (model.py, pretrained.py, cache.py, engine.py, generate.py, ...).

Importing it sets OpenMP's wait policy to PASSIVE unless the environment already names one, and
only while torch is not yet imported (OpenMP reads the variable once, when torch loads it). Idle
OpenMP threads then sleep instead of spinning: on a busy machine, spinning threads take the cores
from the ones doing the work, and decoding's many small matmuls each wait for every thread
(measured on a loaded 2-core machine: 97 matmuls of the 560m decode shape took 1.35 s with the
default policy, 0.16 s with PASSIVE). With torch imported first, set OMP_WAIT_POLICY yourself.
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
