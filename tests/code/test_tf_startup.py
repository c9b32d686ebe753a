"""TensorFlow's start-up notices are dropped from stderr; everything else it prints is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medflow.tf_startup import drop_notices, quietly

NOTICES = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1795325164.437371   11613 port.cc:153] oneDNN custom operations are on. You may see ...\n",
    (b"I0000 00:00:1795325164.439523   11613 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
     b"GPU will not be used.\n"),
]
CUINIT = (b"E0000 00:00:1795325218.006944   12093 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
          b"Failed call to cuInit: UNKNOWN ERROR (303)\n")
OTHER = b"W0000 00:00:1795325218.1   12093 some_op.cc:7] a real warning\n"


def test_notices_dropped_other_lines_kept() -> None:
    assert drop_notices([*NOTICES, OTHER]) == [OTHER]
    assert drop_notices([*NOTICES, CUINIT]) == []  # no driver: no GPU expected, the cuInit failure is no error
    assert drop_notices([CUINIT]) == [CUINIT]  # a driver is there but CUDA fails: that is worth seeing


def test_quietly_writes_back_what_is_not_a_notice(capfd: pytest.CaptureFixture[str]) -> None:
    def noisy() -> int:
        for line in (*NOTICES, OTHER):
            os.write(2, line)
        return 7

    assert quietly(noisy) == 7
    assert capfd.readouterr().err == OTHER.decode()

    def fails() -> None:
        os.write(2, NOTICES[0] + b"error: explained\n")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        quietly(fails)
    assert capfd.readouterr().err == "error: explained\n"  # nothing lost when the work raises


def test_importing_tensorflow_after_medflow_prints_no_notices() -> None:
    code = "import medflow, sys, tensorflow as tf; print(int(tf.constant(2) + 1)); print('after', file=sys.stderr)"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "3\n"
    assert done.stderr.endswith("after\n")
    for notice in ("InitializeLog", "oneDNN custom operations", "Could not find cuda drivers"):
        assert notice not in done.stderr
