
from orchestrator import cli


def test_data_check_prints_every_count(data_root, capsys):
    assert cli.main(["data", "check", "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "10000 of 10000" in out and "998 of 1000" in out and "3610 of 3610" in out


def test_data_check_fails_on_bad_data(tmp_path, capsys, monkeypatch, data_root):
    monkeypatch.setenv("EAC_OFFLINE", "1")
    monkeypatch.setenv("EAC_DATA_DIR", str(data_root))  # restored after the CLI overrides it
    assert cli.main(["data", "check", "--data-dir", str(tmp_path)]) == 1
    assert "ERROR" in capsys.readouterr().out


def test_answers_table(default_model, data_root, capsys):
    assert cli.main(["answers", "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "Danielle Darrieux" in out and "English" in out
    assert "already knows" in out and "of 3 facts" in out
