"""Run the whole pipeline (prepare -> embed -> tokenize -> assign -> generate -> evaluate) as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/full_pipeline.py --config jobs/configs/demo.yaml --run /abs/path/runs/demo

Run directly (python jobs/full_pipeline.py ...) it starts a local Ray cluster. Stages already complete
for the same config are skipped; an interrupted stage resumes from its last checkpoint.
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
    sys.exit(job_main(None))
