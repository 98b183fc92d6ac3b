"""Issue 4 benchmark: one IOC alert to a whole city, N = 1,000, 5,000 and 10,000 simulated speakers.

    .venv/bin/python bench/emergency.py                     # all three sizes, 4 fleet processes
    .venv/bin/python bench/emergency.py --sizes 1000 --rounds 1

The same harness as bench/fanout.py (read its docstring for what is started and measured), with the
controller path being an IOC key's `POST /api/v1/alerts` of a pre-approved city-wide template: emergency
class, speech made once (in the warm-up), every speaker preempted. In the same run, on the same broker and
fleet connections: the raw per-device fan-out (a) and the bare broker fan-out (b). Goal at N = 10,000:
>= 99 % `playing` within p99 1.5 s of the API call, and within 2.5 × the raw fan-out.
Results: bench/results/emergency-<UTC>.json.
"""

from __future__ import annotations

import sys

from fanout import main

if __name__ == "__main__":
    sys.exit(main(["--via", "alerts", "--sizes", "1000,5000,10000", "--processes", "4", *sys.argv[1:]]))
