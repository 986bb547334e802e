"""The Serve application builder, importable as `serve.app:build_app` (see serve/config.yaml).

The deployments live in cost_dist/serving.py; this module only re-exports the builder so that the
import path Serve configs use stays short and stable.
"""

from cost_dist.serving import build_app

__all__ = ["build_app"]
