"""``blkback bench``: blkback against nbdkit and qemu-nbd, measured with fio over NBD.

Modules: :mod:`.workloads` (the fio cells), :mod:`.fio` (command line and JSON parsing),
:mod:`.servers` (start, probe, account and stop one server process), :mod:`.runner` (the
interleaved, repeated schedule), :mod:`.report` (medians, ratios, Markdown, JSON, PNG) and
:mod:`.command` (the CLI).
"""

from __future__ import annotations
