"""``python -m r1fast.plan RECIPE ...``: the same as ``r1fast plan RECIPE ...``."""
import sys

from r1fast.plan.cli import plan_main

sys.exit(plan_main(sys.argv[1:]))
