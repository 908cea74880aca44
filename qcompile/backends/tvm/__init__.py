"""TVM (Relax) backend: IR -> Relax -> scheduled TIR -> shared library, for x86 and arm64.

TVM's runtime thread pool defaults to half the hardware threads (it assumes SMT
siblings), i.e. a single thread on a 2-core machine, and reads ``TVM_NUM_THREADS``
once, when the pool first starts — which can already happen while compiling
(constant folding runs kernels).  So the default is set here, before TVM is
imported by this package: every core this process may run on, unless the user set
``TVM_NUM_THREADS`` themselves.
"""

import os

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
