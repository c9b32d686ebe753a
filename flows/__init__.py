"""Prefect flows around the DVC pipeline: training, monitoring, retraining (+ deployments in deploy.py).

Importing this package switches telemetry off and keeps Prefect's state in the project's
``.prefect/`` folder unless the environment already says otherwise.
"""

import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
