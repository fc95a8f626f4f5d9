"""zoo.train never loses a run: no silent overwrite, no silent fresh start on --resume."""

import pytest

from zoo import train


def test_a_finished_run_is_not_overwritten(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"the finished run's model")
    (tmp_path / "history.json").write_text("{}")
    with pytest.raises(train.SetupError, match="holds a finished run.*another --output"):
        train.run("mnist_mlp", "digits", output=str(tmp_path), verbose=0)
    assert (tmp_path / "model.keras").read_bytes() == b"the finished run's model"


@pytest.mark.parametrize("make_output", [False, True])
def test_resume_without_a_backup_is_refused(tmp_path, make_output):
    output = tmp_path / ("run" if make_output else "misspelled")
    if make_output:
        output.mkdir()
    with pytest.raises(train.SetupError, match="--resume .* (does not exist|has no backup)"):
        train.run("mnist_mlp", "digits", output=str(output), resume=True, verbose=0)
    assert output.exists() == make_output  # nothing created


def test_the_command_line_reports_it_as_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        train.main(["--model", "mnist_mlp", "--dataset", "digits", "--resume",
                    "--output", str(tmp_path / "typo")])
    assert exit_status.value.code == 2
    assert "does not exist" in capsys.readouterr().err
