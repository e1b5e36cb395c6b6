"""tools/mutation_check.py: every mutation still applies to train_gpt.py, and the tool restores the script."""
from pathlib import Path

import mutation_check as mc

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutation_breaks_one_place_of_the_script_and_names_test_files_that_exist():
    script = (ROOT / "train_gpt.py").read_text()
    for name, code, broken, files in mc.MUTATIONS:
        assert script.count(code) == 1, name
        assert broken != code and script.replace(code, broken) != script, name
        assert files and all((ROOT / f).is_file() for f in files), name
    assert len({name for name, *_ in mc.MUTATIONS}) == len(mc.MUTATIONS)


def test_the_tool_reports_a_caught_mutation_and_restores_the_script(monkeypatch, capsys, tmp_path):
    script = tmp_path / "train_gpt.py"  # a copy: the tool writes the script it checks
    script.write_text((ROOT / "train_gpt.py").read_text())
    before = script.read_text()
    monkeypatch.setattr(mc, "ROOT", tmp_path)
    seen = []
    monkeypatch.setattr(mc, "first_failure", lambda files: seen.append(script.read_text()) or "t::x")
    monkeypatch.setattr("sys.argv", ["mutation_check.py", "--only", "LR floor"])
    assert mc.main() == 0
    assert len(seen) == 1 and "return warm * down\n" in seen[0] and seen[0] != before
    assert script.read_text() == before
    assert "LR floor ignored: caught by t::x" in capsys.readouterr().out
    monkeypatch.setattr(mc, "first_failure", lambda files: None)
    assert mc.main() == 1 and "NOT CAUGHT" in capsys.readouterr().out
    assert script.read_text() == before
