"""The built-in default job's guard for the user's files (the job itself runs in the README's main command)."""
from protege.engine.training.quickstart import MARKER, main


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    assert main(["--out", str(tmp_path)]) == 2
    assert "nothing was deleted" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_an_earlier_quickstart_output_is_recognised_by_its_marker(tmp_path, capsys, monkeypatch):
    (tmp_path / MARKER).write_text("")
    (tmp_path / "old-report.json").write_text("{}")
    monkeypatch.setattr("shutil.which", lambda name: None)   # stop right after the guard: no bwrap
    assert main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bwrap" in err and "nothing was deleted" not in err
