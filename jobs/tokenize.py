"""Run the tokenize stage alone as a Ray job (same flags and code path as jobs/full_pipeline.py).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tokenize.py --config jobs/configs/demo.yaml --run RUN [--set tokenizer.loss=re+co]

Trains the CoST quantizer with Ray Train + DeepSpeed on cfg.resources.tokenizer workers; a rerun with
the same run and config resumes from the last epoch checkpoint.
"""

import sys
from pathlib import Path

# The job's working directory is the repository: import the shipped cost_dist, not an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_dist.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("tokenize"))
