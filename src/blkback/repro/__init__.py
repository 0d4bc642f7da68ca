"""``blkback repro``: the seed's three experiments on real memory pressure (see command.py).

* :mod:`~blkback.repro.testbed`: environment checks, the server in dom0, guests, sampler.
* :mod:`~blkback.repro.memory`: experiments 1, 2 and 4 (pools tip dom0 into swap).
* :mod:`~blkback.repro.overhead`: experiment 3 (the seed's dd loop on ext4 over NBD).
* :mod:`~blkback.repro.runner` and :mod:`~blkback.repro.report`: repeats, results, report.
* ``guest.py``: the guests' load generator, run by Debian's Python with libnbd.
"""

from __future__ import annotations
