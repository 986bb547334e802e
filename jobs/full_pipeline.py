"""Run the whole pipeline (prepare -> embed -> tokenize -> assign -> generate -> evaluate) as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/full_pipeline.py --config jobs/configs/demo.yaml --run /abs/path/runs/demo

Run directly (python jobs/full_pipeline.py ...) it starts a local Ray cluster. Stages already complete
for the same config are skipped; an interrupted stage resumes from its last checkpoint.
"""

import sys
from pathlib import Path

# The job's working directory is the repository: import the shipped cost_dist, not an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_dist.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main(None))
