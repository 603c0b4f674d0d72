"""`bench pacing`: the real verifier runner and pacing against a stand-in sampler and VLM (CPU, a few seconds)."""

import json

import pytest

from iamflow_core.bench.pacing import main, simulate


def test_a_fast_verifier_scores_the_frame_choices_in_time():
    row = simulate(chunk_s=0.02, job_s=0.0, submit_at=0.3, chunks=20, policy="current")
    assert row["frame_choices"] == 19 and row["dropped"] == 0 and row["scored"] == 19
    assert row["with_scores"] >= 10  # verdicts come within the chunk (a loaded CI machine may miss a few)


def test_a_slow_verifier_still_scores_every_attribute_check():
    """Jobs three chunks long: most plain jobs are not sent (they could not count), but every check runs."""
    row = simulate(chunk_s=0.01, job_s=0.03, submit_at=0.5, chunks=40, policy="current")
    assert row["skipped"] > 0 and row["checks"] == 3 and row["checks_scored"] == 3
    assert row["scored"] + row["dropped"] + row["skipped"] == 39


def test_the_command_prints_both_policies_and_refuses_bad_values(capsys):
    lines = list(main(["--chunk-ms", "100", "--job-ms", "50", "--chunks", "6", "--scale", "20"]))
    assert lines[0].startswith("# chunk 100 ms, job 50 ms")
    assert [json.loads(line)["policy"] for line in lines[1:]] == ["current", "before"]
    with pytest.raises(SystemExit):
        list(main(["--submit-at", "1.5"]))
    assert "--submit-at 1.5" in capsys.readouterr().err
