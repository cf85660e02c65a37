"""A small kill-anywhere campaign: SIGKILL a CPU training run 3 times (one kill aimed at a
checkpoint write) and check it always resumes, with no corrupt checkpoint and no step lost
beyond the checkpoint interval. The full campaign is `make kill-campaign`."""

import json

from studies import kill_campaign


def test_training_survives_sigkill_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    report = tmp_path / "figures.json"
    code = kill_campaign.main(
        ["--kills", "3", "--seed", "0", "--out", str(tmp_path / "campaign"), "--json", str(report)]
    )
    figures = json.loads(report.read_text())
    assert code == 0, figures["failures"]
    assert figures["kills_by_mode"] == {"random": 1, "after_checkpoint": 1, "mid_write": 1}
    assert figures["kills_survived"] == 3
    assert figures["corrupt_checkpoints"] == 0 and figures["checkpoints_checked"] >= 3
    assert 0 <= figures["max_steps_lost"] <= figures["checkpoint_every"]
    assert len(figures["steps_lost"]) == 3
    assert figures["final_step"] == figures["target_step"]
    assert figures["loss_csv_complete"]
    assert "| Kills survived (resume worked) | 3/3 |" in capsys.readouterr().out
