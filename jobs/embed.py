"""Run the embed stage alone as a Ray job (same flags and code path as `cost-dist embed`).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/embed.py --config jobs/configs/demo.yaml --run s3://bucket/runs/demo [--set embed.batch_size=256]
"""

import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ first on sys.path, where jobs/tokenize.py would shadow the standard
# library's tokenize module (imported by logging). Put the repository root there instead, which also
# imports the shipped cost_dist (the job's working directory) rather than an installed copy.
_JOBS_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _JOBS_DIR]
sys.path.insert(0, str(_JOBS_DIR.parent))

from cost_dist.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("embed"))
